"""Install the powernorm-fairseq plugin (the ``powernorm_plugin`` package).

``pip install .`` installs the plugin alone and keeps whatever fairseq the user has;
``pip install .[fairseq]`` adds the fairseq build that installs on Python >= 3.11;
``pip install .[recipes]`` adds what the reproduction recipes need, and
``pip install .[test]`` what the test suite needs.
"""
from setuptools import find_packages, setup

FAIRSEQ = ["ve-fairseq==0.12.3", "sacrebleu>=2.0", "sentencepiece>=0.1.99"]
RECIPES = ["sacremoses>=0.1"]  # Moses-compatible tokenization for the paper's BLEU

setup(
    name="powernorm-fairseq",
    version="0.1.0",
    description="PowerNorm and Normalize-and-Project (NaP) for fairseq, as a --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["powernorm_plugin", "powernorm_plugin.*"]),
    python_requires=">=3.9",
    # ninja: torch's extension builder needs it to build the native CPU kernels on first use
    install_requires=["torch>=2.0", "ninja"],
    package_data={"powernorm_plugin.modules": ["csrc/*.cpp", "csrc/*.h", "csrc/*.cu"]},
    extras_require={
        "fairseq": FAIRSEQ,
        "recipes": FAIRSEQ + RECIPES,
        "test": FAIRSEQ + RECIPES + ["pytest>=7"],
    },
    entry_points={
        "console_scripts": [
            "powernorm-user-dir=powernorm_plugin.__main__:print_user_dir",
        ],
    },
)
