"""The embedded default dataset: synthetic BraTS-like cases generated once into the cache.

Every command that takes `--data-dir` falls back to this dataset, so the project runs on a
fresh machine without downloads; pass a real BraTS folder to use real data instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vi_seg_jax.data.cache import cache_root
from vi_seg_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DefaultDataset:
    """What the default dataset holds. Changing a field generates a new dataset folder.

    50 cases: the paper's protocol on a CPU scale (a fixed test set, training subsets of
    5/10/15/20 drawn from the rest) on the generator's small default grid.
    """

    num_cases: int = 50
    layout: str = "brats2021"
    domain: str = "tumour"
    shape: tuple[int, int, int] = (64, 64, 48)
    seed: int = 0

    @property
    def folder_name(self) -> str:
        from vi_seg_jax.data.synthetic import GENERATOR_VERSION

        shape = "x".join(map(str, self.shape))
        return (
            f"{self.layout}-{self.domain}-{shape}-n{self.num_cases}-seed{self.seed}"
            f"-v{GENERATOR_VERSION}"
        )


def default_dataset_dir(spec: DefaultDataset = DefaultDataset()) -> Path:
    return cache_root() / "synthetic" / spec.folder_name


def ensure_default_dataset(
    spec: DefaultDataset = DefaultDataset(), *, progress: bool = True
) -> Path:
    """Returns the default dataset's folder, generating it on first use."""
    from vi_seg_jax.data.synthetic import write_dataset

    folder = default_dataset_dir(spec)
    if folder.is_dir():
        return folder
    print(f"generating the default synthetic dataset ({spec.num_cases} cases) in {folder}")
    try:
        write_dataset(
            folder,
            num_cases=spec.num_cases,
            layout=spec.layout,
            domain=spec.domain,
            shape=spec.shape,
            seed=spec.seed,
            progress=progress,
        )
    except DataError:
        # Another process finished the same dataset first: its copy is as good as ours.
        if not folder.is_dir():
            raise
    return folder
