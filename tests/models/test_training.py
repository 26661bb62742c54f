"""A tiny real training run on MovieLens-100K that must beat a constant predictor."""
import numpy as np

from models import training
from models.ctr_metrics import auc, logloss
from models.split_tensors import SplitTensors
from models.training import TrainConfig
from tests.conftest import base_settings


def test_tiny_training_beats_a_constant_predictor():
    settings = base_settings(drift_threshold=0.0)
    data = training.prepare(settings, dataset="ml-100k", n_users=80, depth=3, k=2,
                            history_len=30, data_seed=1, sources=())
    assert len(data.splits["train"]) > 1000
    tensors = {name: SplitTensors(s, None, None) for name, s in data.splits.items()}
    config = training.model_config("din", data.catalog, interest=False)
    model = training.build_model(config, data.catalog, seed=0)
    result = training.fit(model, tensors["train"], tensors["val"], TrainConfig(epochs=3, seed=0))
    assert result.epochs_run >= 1 and result.best_epoch >= 1
    held_out = np.concatenate([data.splits["val"].label, data.splits["test"].label])
    probs = np.concatenate([training.predict(model, tensors["val"]),
                            training.predict(model, tensors["test"])])
    # a constant predictor has AUC 0.5 and the log loss of the base rate
    assert auc(held_out, probs) > 0.58
    rate = float(data.splits["train"].label.mean())
    assert logloss(held_out, probs) < logloss(held_out, np.full(len(held_out), rate))
