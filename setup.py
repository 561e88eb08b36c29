"""Packaging for the ASCL pipeline.

Dataflow ships this code to its workers with ``--setup_file ./setup.py``, so
the three packages the pipeline runs (``models``, ``pipeline``,
``beam_jobs``) and their runtime dependencies are declared here.  Exact,
reproducible versions of everything live in ``requirements.txt``.
"""

from setuptools import find_packages, setup

setup(
    name="ascl-tf",
    version="0.1.0",
    description="Adaptive Soft Contrastive Learning (ASCL) in TensorFlow/Keras 3: "
                "Beam preparation, model.fit training under tf.distribute, TF Serving exports.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["models", "models.*", "pipeline", "pipeline.*",
                                    "beam_jobs", "beam_jobs.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        "apache-beam==2.77.0",
        "tensorboard==2.21.0",
        "tensorflow-serving-api==2.21.0",
        "scikit-learn==1.9.1",
        "pillow==12.3.0",
        "pyyaml==6.0.4",
        "google-crc32c==1.8.0",
        "matplotlib==3.11.2",
        "tensorflow-hub==0.16.1",  # imported by Beam's TensorFlow RunInference handler
    ],
    extras_require={"test": ["pytest==9.2.0"],
                    # KerasHub backbones (model.backbone keras_hub.NAME); pins: requirements-hub.txt
                    "hub": ["keras-hub==0.32.0"]},
    entry_points={"console_scripts": ["ascl=pipeline.cli:main"]},
)
