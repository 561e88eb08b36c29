"""Writes byol_reference_two_steps.npz: the BYOL form's weights after two steps as the code
was before the recipe options (symmetric loss, EMA schedule) existed, made once with that code
(commit b6df438). tests/models/test_byol_model.py checks that the reference recipe still
gives them. Run from the repository root: python tests/models/data/make_byol_reference.py
"""
import sys; sys.path.insert(0, ".")
import numpy as np, keras
from models import BYOLModel, build_backbone, prediction_head, projection_head

def reference_model(mode):
    keras.utils.set_random_seed(0)
    backbone = build_backbone("small_cnn", input_shape=(8, 8, 3), norm="batch", widths=(8, 16, 16))
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    predictor = prediction_head(16, hidden_dims=(24,))
    model = BYOLModel(backbone, projector, predictor, seed=0, num_neighbors=3, mode=mode,
                      weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model

rng = np.random.default_rng(3)
strong, weak = rng.random((8, 8, 8, 3), dtype=np.float32), rng.random((8, 8, 8, 3), dtype=np.float32)
out = {"strong": strong, "weak": weak}
for mode in ("ascl", "byol"):
    model = reference_model(mode)
    for step in range(2):
        logs = model.train_on_batch({"strong_view": strong, "weak_view": weak}, return_dict=True)
    for i, w in enumerate(model.get_weights()):
        out[f"{mode}/{i}"] = np.asarray(w)
    print(mode, len(model.get_weights()), logs)
np.savez_compressed("tests/models/data/byol_reference_two_steps.npz", **out)
