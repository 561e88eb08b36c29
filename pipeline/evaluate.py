"""Evaluating an encoder: weighted kNN, linear probe, raw-pixel baselines, projector.

kNN follows InstDisc (Wu et al., 2018), the monitor every MoCo/ASCL paper
reports: cosine similarity of L2-normalised backbone features, the top-k
training neighbours vote for their class with weight ``exp(sim / t)``
(k=200, t=0.1).  The same classifier on flattened normalised pixels is the
raw-pixel baseline, so a report shows what self-supervision bought; likewise the
linear probe's baseline is the same linear classifier trained on the pixels.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from beam_jobs.atomic_json import write_json
from beam_jobs.errors import MissingInput
from pipeline import data
from pipeline.run_dir import RunDir, load_trained_model


def embed(encoder, dataset, *, normalize=True):
    """``(features [N, F] float32, labels [N] int64)`` of ``(images, labels)`` batches,
    L2-normalised unless ``normalize`` is false (the linear probe takes them as they are)."""
    def features_of(images):
        features = tf.cast(encoder(images, training=False), tf.float32)
        return tf.math.l2_normalize(features, axis=1) if normalize else features

    compute = tf.function(features_of)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(compute(images).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(features), np.concatenate(labels)


def flatten_pixels(images, training=False):
    """The raw-pixel "encoder": normalised pixels as one vector per image."""
    del training  # same call signature as a Keras model
    return tf.reshape(images, [tf.shape(images)[0], -1])


def pixel_encoder(image_shape):
    """The raw-pixel "encoder" as a Keras model (flattened normalised pixels), so the
    linear probe can train the same classifier on pixels: the fair baseline for a probe."""
    return keras.Sequential([keras.Input(image_shape), keras.layers.Flatten()],
                            name="raw_pixels")


@tf.function(reduce_retracing=True)
def _class_scores(batch, bank, bank_labels, k, temperature, num_classes):
    """One chunk's kNN class scores. Defined once, with the bank an argument: the monitor
    calls kNN every epoch with a new bank, and a ``tf.function`` built inside each call (it
    captured that call's bank) traced a new graph every time, which TF warned about as
    retracing."""
    similarity = tf.matmul(batch, bank, transpose_b=True)
    top_similarity, top_index = tf.math.top_k(similarity, k=k)
    votes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)
    return tf.reduce_sum(votes * tf.exp(top_similarity / temperature)[..., None], axis=1)


def knn_scores(train_features, train_labels, features, *, k=200, temperature=0.1, num_classes,
               chunk=1024):
    """Class scores ``[N, C]``: sum over the top-k neighbours of ``exp(sim / t)`` per class."""
    bank = tf.constant(train_features, tf.float32)
    bank_labels = tf.constant(train_labels, tf.int64)
    k = min(k, bank.shape[0])
    return np.concatenate([
        _class_scores(tf.constant(features[i:i + chunk], tf.float32), bank, bank_labels,
                      k, float(temperature), int(num_classes)).numpy()
        for i in range(0, len(features), chunk)])


def topk_accuracy(scores, labels, ks=(1, 5)):
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return {f"top{k}": float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1)))
            for k in ks if k <= scores.shape[1]}


def knn_accuracy(train, test, *, k, temperature, num_classes):
    """kNN top-1/top-5 of ``test`` features against the ``train`` bank (both
    ``(features, labels)``)."""
    labelled = train[1] >= 0
    scores = knn_scores(train[0][labelled], train[1][labelled], test[0], k=k,
                        temperature=temperature, num_classes=num_classes)
    return topk_accuracy(scores, test[1])


def encoder_knn(backbone, manifest, *, train_split, eval_split, k, temperature, batch_size):
    """kNN accuracy of ``backbone`` features (centre views) on ``eval_split``, with
    ``train_split`` as the labelled bank (split names or ``splits.Selection``s)."""
    train = embed(backbone, data.eval_dataset(manifest, train_split, batch_size=batch_size))
    test = embed(backbone, data.eval_dataset(manifest, eval_split, batch_size=batch_size))
    return knn_accuracy(train, test, k=k, temperature=temperature,
                        num_classes=len(manifest["class_names"]))


def raw_pixel_knn(manifest, *, train_split, eval_split, k, temperature, batch_size):
    """The same kNN on flattened normalised pixels: the baseline to beat."""
    return encoder_knn(flatten_pixels, manifest, train_split=train_split, eval_split=eval_split,
                       k=k, temperature=temperature, batch_size=batch_size)


def probe_milestone_epochs(epochs, milestones):
    """Epochs at which the probe's learning rate drops tenfold: ``milestones`` are fractions
    of ``epochs`` (the reference drops at 60% and 80% of its 100 epochs)."""
    return sorted({max(1, int(round(fraction * epochs))) for fraction in milestones})


def linear_probe(backbone, manifest, *, train_split, eval_split, epochs, lr, milestones,
                 batch_size, augment=True, seed=0, reference_batch_size=256, verbose=0):
    """Top-1/top-5 of a linear classifier trained on the frozen backbone's features,
    after the last epoch (never the best epoch on ``eval_split``).

    As the reference: features as the backbone gives them (no normalisation), a
    Dense layer initialised N(0, 0.01) with zero bias, SGD with Nesterov momentum
    0.9 and no weight decay, learning rate ``lr`` at ``reference_batch_size``
    (scaled linearly with ``batch_size``) divided by 10 at each fraction of
    ``epochs`` in ``milestones``.  With ``augment`` the classifier sees
    ``RandomResizedCrop(0.08-1)`` + flip views through the frozen backbone every
    epoch (the reference protocol); without it, features of the centre views
    are computed once (much faster on a CPU) and the report says so.
    """
    num_classes = len(manifest["class_names"])
    steps = -(-data.splits.as_selection(train_split).count(manifest) // batch_size)  # batches
    base_lr = lr * batch_size / reference_batch_size
    drops = probe_milestone_epochs(epochs, milestones)
    # The optimizer's step s uses schedule(s); epoch e + 1 starts at step e * steps, and
    # PiecewiseConstantDecay keeps the old value up to and including a boundary.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [epoch * steps - 1 for epoch in drops],
        [base_lr * 0.1 ** i for i in range(len(drops) + 1)])
    classifier = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
        bias_initializer="zeros", name="linear_probe",
        dtype="float32")  # float32 logits whatever mixed-precision policy is in force
    backbone.trainable = False
    try:
        if augment:
            inputs = keras.Input(backbone.input_shape[1:])
            model = keras.Model(inputs, classifier(backbone(inputs, training=False)))
            train = data.probe_train_dataset(manifest, train_split, batch_size=batch_size,
                                             seed=seed)
            test = data.eval_dataset(manifest, eval_split, batch_size=batch_size)
        else:
            train_features, train_labels = embed(backbone, data.eval_dataset(
                manifest, train_split, batch_size=batch_size), normalize=False)
            test_features, test_labels = embed(backbone, data.eval_dataset(
                manifest, eval_split, batch_size=batch_size), normalize=False)
            model = keras.Sequential([keras.Input((train_features.shape[1],)), classifier])
            train = tf.data.Dataset.from_tensor_slices((train_features, train_labels)).shuffle(
                len(train_labels), seed=seed).batch(batch_size)
            test = tf.data.Dataset.from_tensor_slices((test_features, test_labels)).batch(
                batch_size)
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseTopKCategoricalAccuracy(1, name="top1"),
                               keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")])
        if epochs:
            model.fit(train, epochs=epochs, verbose=verbose,
                      shuffle=False)  # tf.data already shuffles; silences Keras's warning
        result = model.evaluate(test, verbose=0, return_dict=True)
    finally:
        backbone.trainable = True
    return {"top1": float(result["top1"]), "top5": float(result["top5"]), "epochs": epochs,
            "lr": base_lr, "milestone_epochs": drops, "batch_size": batch_size,
            "inputs": ("RandomResizedCrop(0.08-1) + flip views through the frozen backbone, "
                       "every epoch" if augment else
                       "features of the centre views, computed once (no augmentation)")}


def write_projector(backbone, manifest, split, log_dir, *, samples, batch_size):
    """Embeddings of ``samples`` images of ``split`` (a fixed, class-mixed sample) for
    TensorBoard's projector."""
    from tensorboard.plugins import projector

    os.makedirs(log_dir, exist_ok=True)
    features, labels = embed(backbone, data.eval_dataset(
        manifest, data.splits.Selection(split, limit=samples), batch_size=batch_size))
    names = manifest["class_names"]
    with open(os.path.join(log_dir, "metadata.tsv"), "w") as handle:
        handle.write("label\tclass\n")
        for label in labels:
            handle.write(f"{label}\t{names[label] if label >= 0 else 'unlabelled'}\n")
    embedding = tf.Variable(features, name="embedding")
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(log_dir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(log_dir, config)
    return len(labels)


def evaluate_run(run_dir, *, checkpoint="last", output=None, linear=True, verbose=0):
    """kNN, linear probe and raw-pixel baseline for a trained run; writes the JSON report.

    ``checkpoint`` is ``last`` (the default: the final weights, as the reference
    reports), ``best`` (chosen by kNN on the validation hold-out, never on the
    test split) or a weights path; the report records which one and what chose
    it.  kNN uses the whole training split as its bank and the linear probe
    trains on it.  Also writes a sample of test embeddings for TensorBoard's
    projector under ``RUN/tensorboard/projector``.  Returns the report.
    """
    run = RunDir(run_dir)
    if output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise MissingInput(f"--output {output}: its folder does not exist")
    model, config, manifest = load_trained_model(run_dir, checkpoint)
    e, d = config.evaluation, config.data
    limit = d.eval_limit
    splits = dict(train_split=data.splits.Selection(d.train_split, limit=limit),
                  eval_split=data.splits.Selection(d.eval_split, limit=limit))
    knn = dict(k=e.knn_k, temperature=e.knn_temperature, batch_size=e.batch_size)
    report = {
        "run_dir": run_dir, "checkpoint": run.checkpoint_info(checkpoint),
        "dataset": d.dataset, "train_split": splits["train_split"].description,
        "eval_split": splits["eval_split"].description,
        "knn": {**encoder_knn(model.backbone, manifest, **splits, **knn),
                "k": e.knn_k, "temperature": e.knn_temperature},
        "raw_pixel_knn": {**raw_pixel_knn(manifest, **splits, **knn),
                          "k": e.knn_k, "temperature": e.knn_temperature},
    }
    if linear:
        probe = dict(epochs=e.linear_epochs, lr=e.linear_lr, milestones=e.linear_milestones,
                     batch_size=e.linear_batch_size, augment=e.linear_augment,
                     seed=config.train.seed, verbose=verbose)
        report["linear_probe"] = linear_probe(model.backbone, manifest, **splits, **probe)
        if e.raw_pixel_probe:
            report["raw_pixel_linear_probe"] = linear_probe(
                pixel_encoder(model.backbone.input_shape[1:]), manifest, **splits, **probe)
    if e.projector_samples:
        report["projector"] = {
            "log_dir": os.path.join(run.tensorboard, "projector"),
            "samples": write_projector(model.backbone, manifest, d.eval_split,
                                       os.path.join(run.tensorboard, "projector"),
                                       samples=e.projector_samples, batch_size=e.batch_size)}
    write_json(output or run.evaluation_path, report, indent=2)
    return report
