"""calofast: fast calorimeter-shower simulation with diffusion models."""
__version__ = "0.1.0"
