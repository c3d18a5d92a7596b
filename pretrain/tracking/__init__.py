"""Experiment tracking (MLflow): see pretrain/tracking/tracker.py."""
from pretrain.tracking.tracker import NullTracker, Tracker, local_store_uri, start_tracking, sync_pending

__all__ = ["NullTracker", "Tracker", "local_store_uri", "start_tracking", "sync_pending"]
