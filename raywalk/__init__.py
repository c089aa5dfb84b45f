"""raywalk: transformers trained on rule-keeping random walks over DCSBM graphs, on Ray Train."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `raywalk.load` without importing torch, pyarrow or ray on `import raywalk`
    if name in ("load", "Experiment", "LoadError"):
        from raywalk import loader

        return getattr(loader, name)
    if name == "GPT":
        from raywalk.science.model import GPT

        return GPT
    if name == "model":   # `raywalk.model.GPT(**model.json)`, as export hand-offs name it
        from raywalk.science import model

        return model
    raise AttributeError(f"module 'raywalk' has no attribute {name!r}")
