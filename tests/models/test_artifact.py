"""Artifact save/load round trip (identical outputs), LATEST resolution, the tiny artifact."""
import json

import numpy as np
import pytest
import torch

from models import artifact, training
from models.artifact import ArtifactError, CtrScorer, InterestModel
from models.ctr_data import Catalog
from models.text_encoder import TextEncoder
from tests.conftest import base_settings

N_ITEMS = 12


def _catalog() -> Catalog:
    ids = [str(100 + i) for i in range(N_ITEMS)]
    genres = np.zeros((N_ITEMS + 1, 2), dtype=np.int64)
    genres[1:, 0] = np.arange(N_ITEMS) % 3 + 1
    return Catalog("synthetic", {i: n for n, i in enumerate(ids, 1)}, genres,
                   ["Comedy", "Drama", "Horror"], {i: f"Film {i}" for i in ids})


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


@pytest.mark.parametrize("backbone", ["din", "dcnv2"])
def test_round_trip_gives_identical_outputs(tmp_path, encoder, backbone):
    catalog = _catalog()
    config = training.model_config(backbone, catalog, interest=True, k=2)
    model = training.build_model(config, catalog, seed=0).eval()
    path = artifact.save(model, config, catalog, tmp_path / "uif", history_len=5,
                         metrics={"test_auc": 0.5}, training={"note": "unit test"})
    assert artifact.resolve(tmp_path / "uif") == path
    im = InterestModel.load(tmp_path / "uif", encoder=encoder)
    assert im.version == path.name and im.dim == model.interest.out_dim == 32
    items = [(["likes slow dramas", "a horror binge"], "Enjoys horror and drama."),
             ([], "Enjoys comedy."), ([], "")]
    vectors = im.user_vectors(items)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    # same numbers as the in-memory head on the same encoder vectors
    enc = encoder.encode(["likes slow dramas", "a horror binge", "Enjoys horror and drama.",
                          "Enjoys comedy."])
    parts = torch.zeros(3, 2, 384)
    parts[0, 0], parts[0, 1] = torch.from_numpy(enc[0]), torch.from_numpy(enc[1])
    casc = torch.zeros(3, 384)
    casc[0], casc[1] = torch.from_numpy(enc[2]), torch.from_numpy(enc[3])
    with torch.no_grad():
        expected = model.interest(parts, torch.tensor([[True, True], [False, False], [False, False]]),
                                  casc, torch.tensor([True, True, False])).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vectors[2], im.empty_vector(), atol=1e-6)
    # the scorer matches the model on the same batch
    scorer = CtrScorer.load(path)
    history, candidates = ["100", "105", "999"], ["101", "102", "103"]
    got = scorer.score(vectors[0], history, candidates, history_ratings=[5, 2, 4])
    batch = {"item": torch.tensor([2, 3, 4]),
             "hist": torch.tensor([[0, 0, 1, 6, 0]] * 3),
             "hist_rating": torch.tensor([[0, 0, 5, 2, 4]] * 3)}
    with torch.no_grad():
        want = torch.sigmoid(model.backbone(batch, torch.from_numpy(vectors[0]).expand(3, -1)))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert not scorer.known("999") and scorer.known("101")
    np.testing.assert_allclose(scorer.score(None, history, candidates, [5, 2, 4]),
                               scorer.score(im.empty_vector(), history, candidates, [5, 2, 4]))
    with pytest.raises(ValueError):
        scorer.score(np.zeros(7, dtype=np.float32), history, candidates)
    # a second load of the same version gives the same numbers
    np.testing.assert_array_equal(InterestModel.load(path, encoder=encoder).user_vectors(items),
                                  vectors)


def test_missing_or_foreign_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="liber train"):
        InterestModel.load(tmp_path)
    (tmp_path / "LATEST").write_text("nope")
    with pytest.raises(ArtifactError):
        CtrScorer.load(tmp_path)
    bad = tmp_path / "v1"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ArtifactError, match="format"):
        CtrScorer.load(bad)


def test_tiny_artifact_is_real_and_loadable(tmp_path, encoder):
    path = training.train_tiny_artifact(base_settings(), tmp_path / "uif")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["dataset"] == "ml-100k" and manifest["training"]["source"] == "item_text"
    assert manifest["training"]["samples"]["train"] > 100
    im = InterestModel.load(tmp_path / "uif", encoder=encoder)
    vec = im.user_vectors([(["Rated high (4-5): \"Star Wars (1977)\""], "Liked: Star Wars")])
    scores = CtrScorer.load(path).score(vec[0], ["50", "181"], ["172", "1", "100"])
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
