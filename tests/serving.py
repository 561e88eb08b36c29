"""Serving a SavedModel as TF Serving would: in a fresh process that imports none of the
project, through its ``serving_default`` signature."""

import os
import subprocess
import sys

import numpy as np


def serve_in_a_clean_process(model_dir, pngs, workdir):
    """``{"embedding", "projection"}`` arrays of ``serving_default`` on the PNG bytes
    ``pngs``, computed in a new Python process (which checks it loaded no project module)."""
    np.save(workdir / "pngs.npy", np.array(pngs, dtype=object), allow_pickle=True)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "assert not any(m.split('.')[0] in ('models', 'pipeline', 'beam_jobs', 'keras_hub') "
        "for m in sys.modules)\n"
        f"model = tf.saved_model.load({str(model_dir)!r})\n"
        f"pngs = np.load({str(workdir / 'pngs.npy')!r}, allow_pickle=True).tolist()\n"
        "out = model.signatures['serving_default'](image_bytes=tf.constant(pngs))\n"
        f"np.save({str(workdir / 'embedding.npy')!r}, out['embedding'].numpy())\n"
        f"np.save({str(workdir / 'projection.npy')!r}, out['projection'].numpy())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: np.load(workdir / f"{name}.npy") for name in ("embedding", "projection")}


def saved_variable_shapes(export_path):
    """The shapes of the variables a SavedModel's checkpoint holds (read from the files: a
    revived export built without tracked layers lists no ``variables``)."""
    import tensorflow as tf

    return [shape for name, shape in tf.train.list_variables(
        os.path.join(str(export_path), "variables", "variables"))
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]


def saved_variable_sizes(export_path):
    """The element counts of ``saved_variable_shapes``, sorted."""
    return sorted(int(np.prod(shape)) for shape in saved_variable_shapes(export_path))


def weight_sizes(*layers):
    """The element counts of ``layers``' weights, sorted: what an export of them should save."""
    return sorted(int(np.prod(weight.shape)) for layer in layers for weight in layer.weights)


PASS_THROUGH_OPS = ("Identity", "Reshape", "Squeeze", "Cast")


def weight_sources(signature):
    """``{"kernels": [...], "biases": [...]}``: for every bfloat16 convolution, depthwise
    convolution and matmul of a loaded ``signature``, the op its weights come from
    (``Const`` or ``ReadVariableOp``, through identities, reshapes and casts), and the same
    for the bias of every bfloat16 ``BiasAdd``."""
    import tensorflow as tf

    sources = {"kernels": [], "biases": []}
    for function in signature.graph.as_graph_def().library.function:
        nodes = {node.name: node for node in function.node_def}

        def source(name, nodes=nodes):
            node = nodes.get(name.lstrip("^").split(":")[0])
            while node is not None and node.op in PASS_THROUGH_OPS:
                node = nodes.get(node.input[0].split(":")[0])
            return node.op if node is not None else "argument"

        for node in function.node_def:
            if node.attr["T"].type != tf.bfloat16.as_datatype_enum:
                continue
            if node.op in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
                sources["kernels"].append(source(node.input[1]))
            elif node.op == "BiasAdd":
                sources["biases"].append(source(node.input[1]))
    return sources
