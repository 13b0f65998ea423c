"""Every path of a run folder, in one place. Nothing else in the trainer spells an output file name.

    {save_path}/
      config.yaml                                   the demo's config (stages 0-2)
      stage0/ autoencoder/ autoencoder_{best,latest}.pt state.pt history.csv
      stage1/ checkpoint_{best,latest}.pt samples.png dataset_latents.pt state.pt history.csv
      stage2_run.json                               result-defining fields of the stage-2 run
      discriminator_iter_{k}/                       per iteration: the latents D trains on and D
        real_latents.pt fake_latents.pt discriminator_{best,state}.pt discriminator_history.{csv,png}
      checkpoints/{name}_iter_{k}_checkpoint_{best,latest}.pt   fine-tuned diffusion (latest = resume state)
      {name}_metrics_iter_{k}.{csv,png}             fine-tune validation history
      {name}_summary.{csv,png}                      quality per iteration (row 0: stage 1)
      samples/{name}_iter_{k}.png                   decoded grid of iteration k
      timings.csv  tracking/  slurm/
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageFolder:
    """A stage-0 or stage-1 folder: its resume state, history and named files."""
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    def __truediv__(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class RunLayout:
    root: Path   # experiment.save_path, resolved
    name: str    # experiment.name: prefixes the stage-2 checkpoint and metric files

    SUMMARY_GLOB = "*_summary.csv"  # a run folder's summary, whatever the experiment's name

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        return cls(Path(cfg.out_dir), cfg.experiment.name)

    # -- stages 0 and 1 -------------------------------------------------------------------------------
    @property
    def stage0(self) -> StageFolder:
        return StageFolder(self.root / "stage0")

    def autoencoder_export(self, tag: str) -> Path:
        return self.root / "stage0" / f"autoencoder_{tag}.pt"

    @property
    def autoencoder_folder(self) -> Path:
        return self.root / "stage0" / "autoencoder"

    @property
    def stage1(self) -> StageFolder:
        return StageFolder(self.root / "stage1")

    def stage1_checkpoint(self, tag: str) -> Path:
        return self.root / "stage1" / f"checkpoint_{tag}.pt"

    @property
    def stage1_grid(self) -> Path:
        return self.root / "stage1" / "samples.png"

    @property
    def stage1_latent_cache(self) -> Path:
        return self.root / "stage1" / "dataset_latents.pt"

    # -- stage 2 --------------------------------------------------------------------------------------
    @property
    def run_record(self) -> Path:
        return self.root / "stage2_run.json"

    def iteration_folder(self, k: int) -> Path:
        return self.root / f"discriminator_iter_{k}"

    def real_latents(self, k: int) -> Path:
        return self.iteration_folder(k) / "real_latents.pt"

    def fake_latents(self, k: int) -> Path:
        return self.iteration_folder(k) / "fake_latents.pt"

    def discriminator_best(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_best.pt"

    def discriminator_state(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_state.pt"

    def discriminator_history(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_history.csv"

    @property
    def checkpoint_folder(self) -> Path:
        return self.root / "checkpoints"

    def diffusion_checkpoint(self, k: int, tag: str) -> Path:
        """Iteration k's fine-tuned diffusion export; "latest" also carries the resume state."""
        return self.checkpoint_folder / f"{self.name}_iter_{k}_checkpoint_{tag}.pt"

    def finetune_history(self, k: int) -> Path:
        return self.root / f"{self.name}_metrics_iter_{k}.csv"

    @property
    def summary(self) -> Path:
        return self.root / f"{self.name}_summary.csv"

    @staticmethod
    def summaries_in(folder: Path) -> list[Path]:
        """The quality summaries in a run folder whose experiment name is not known."""
        return sorted(Path(folder).glob(RunLayout.SUMMARY_GLOB))

    def grid(self, k: int) -> Path:
        return self.root / "samples" / f"{self.name}_iter_{k}.png"

    # -- every stage ----------------------------------------------------------------------------------
    @property
    def timings(self) -> Path:
        return self.root / "timings.csv"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def guide(self, stage2: bool = True) -> list[tuple[str, str]]:
        """(path relative to the root, what it holds) for the main outputs; "*" stands for an iteration."""
        rows = [(self.autoencoder_folder, "frozen AE (diffusers folder)"),
                (self.stage1_checkpoint("best"), "stage-1 diffusion checkpoint"),
                (self.stage1_grid, "decoded sample grid"), (self.config, "the config of every stage")]
        if stage2:
            rows += [(self.iteration_folder("*"), "per iteration: latents, D and its history"),
                     (self.diffusion_checkpoint("*", "{best,latest}"), "fine-tuned diffusion checkpoints"),
                     (self.finetune_history("*"), "fine-tune validation history"),
                     (self.summary, "quality per iteration (row 0: stage 1)"),
                     (self.grid("*"), "decoded grid per stage-2 iteration")]
        return [(str(path.relative_to(self.root)) + ("/" if path.suffix == "" else ""), what) for path, what in rows]


def picture_of(csv_path: Path) -> Path:
    """The picture drawn from a CSV lies beside it."""
    return Path(csv_path).with_suffix(".png")
