"""Run an ONNX file with whatever onnxruntime this interpreter has: python ort_run.py model.onnx in.npz out.npz"""
import sys

import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inputs = dict(np.load(sys.argv[2]))
np.savez(sys.argv[3], out=sess.run(None, inputs)[0], version=np.array(ort.__version__))
