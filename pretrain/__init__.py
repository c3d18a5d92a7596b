"""Softmax-free pretraining: a contextual encoder predicts the target token's embedding."""
__version__ = "0.1.0"

__all__ = ["__version__", "baseline_encoder", "load_encoder"]


def __getattr__(name):
    # Lazy: `import pretrain` stays cheap; export/loading pulls torch only when asked.
    if name in ("load_encoder", "baseline_encoder"):
        from pretrain.downstream import export

        return getattr(export, name)
    raise AttributeError(name)
