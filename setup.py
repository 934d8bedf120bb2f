from setuptools import find_packages, setup

setup(
    name="improved-diffusion-video",
    version="0.1.0",
    description="Flexible video diffusion: one model, many ways to sample long videos.",
    packages=find_packages(include=["improved_diffusion", "improved_diffusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the Makefile as torch==2.13.0; any 2.x works.
        "torch>=2.1",
        "numpy",
        "scipy",  # linear_sum_assignment for the CARLA WD metric
        "tqdm",
        "mpi4py",
        "mpich; platform_system == 'Linux'",
        "blobfile",
        "wandb",
        "moviepy",
        "imageio",
        "imageio-ffmpeg",
        "pillow",
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "import-linter>=2.13"], "mutation": ["mutmut>=3.3"]},
)
