"""raywalk: transformers trained on rule-keeping random walks over DCSBM graphs, on Ray Train."""
__version__ = "0.1.0"
