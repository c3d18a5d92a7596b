"""Softmax-free pretraining: a contextual encoder predicts the target token's embedding."""
__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]


def __getattr__(name):
    # Lazy: `import pretrain` stays cheap; export/loading pulls torch only when asked.
    if name == "load_encoder":
        from pretrain.downstream.export import load_encoder

        return load_encoder
    raise AttributeError(name)
