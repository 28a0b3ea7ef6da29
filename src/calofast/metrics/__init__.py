"""CaloChallenge evaluation metrics: features, histogram comparisons, classifier test, FPD/KPD."""
