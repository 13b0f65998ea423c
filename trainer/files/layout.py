"""Every path of a run folder, in one place. Nothing else in the trainer spells an output file name.

{save_path}/
  config.yaml                                   the demo's config (stages 0-2)
  stage0/ autoencoder/ autoencoder_{best,latest}.pt state.pt history.csv
  stage1/ checkpoint_{best,latest}.pt samples.png dataset_latents.pt state.pt history.csv
          pipeline/                             checkpoint_best.pt as a diffusers pipeline folder
  stage2_run.json                               result-defining fields of the stage-2 run
  discriminator_iter_{k}/                       per iteration: the latents D trains on and D
    real_latents.pt fake_latents.pt discriminator_{best,state}.pt discriminator_history.{csv,png}
    discriminator_online.pt                     online mode: D at the end of the fine-tune
    discriminator_features.pt                   unet_features: fake score + head at the end of the fine-tune
  checkpoints/{name}_iter_{k}_checkpoint_{best,latest}.pt   fine-tuned diffusion (latest = resume state)
  {name}_metrics_iter_{k}.{csv,png}             fine-tune validation history
  {name}_summary.{csv,png}                      quality per iteration (row 0: stage 1)
  reference_{space}.npz                         held-out reals' feature mean/covariance (mu, sigma) per space
  teacher_quality.csv                           demo: the teacher (stage 1 at training.sample_steps), measured
                                                as the summary's rows (one row)
  classifier.pt                                 `advdiff classifier`'s output (the demo's feature space)
  samples/{name}_iter_{k}.png                   decoded grid of iteration k
  samples/{name}_stage1.png                     the stage-1 model, sampled the same way
  samples/{name}_comparison.png                 demo: stage 1 at K, stage 2 at each trained K, stage 1 full
  pipeline/                                     the result as a diffusers pipeline folder (unet/ scheduler/
                                                vae/ model_index.json pipeline.py; diffusion/export)
  report.html                                   one page: grids, quality, histories, time, config
  one_step/                                     demo: the K = 1 companion of a few-step run, a run folder
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
    root: Path  # experiment.save_path, resolved
    name: str  # experiment.name: prefixes the stage-2 checkpoint and metric files

    SUMMARY_GLOB = "*_summary.csv"  # a run folder's summary, whatever the experiment's name
    COMPANION = "one_step"  # the demo's one-step companion run, a run folder inside the few-step run's

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
    def stage1_pipeline(self) -> Path:
        """The best stage-1 checkpoint as a diffusers pipeline folder."""
        return self.root / "stage1" / "pipeline"

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

    def labels_of(self, latents: Path) -> Path:
        """A class-conditional run's labels of a saved latent set (fake_labels.pt beside fake_latents.pt)."""
        return latents.with_name(latents.name.replace("_latents", "_labels"))

    def discriminator_best(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_best.pt"

    def discriminator_state(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_state.pt"

    def discriminator_history(self, k: int) -> Path:
        return self.iteration_folder(k) / "discriminator_history.csv"

    def discriminator_online(self, k: int) -> Path:
        """Online mode: D as it stands at the end of iteration k's fine-tune."""
        return self.iteration_folder(k) / "discriminator_online.pt"

    def discriminator_features(self, k: int) -> Path:
        """discriminator.config.type unet_features: the fake score's UNet and the head on its bottleneck at
        the end of iteration k's fine-tune."""
        return self.iteration_folder(k) / "discriminator_features.pt"

    def online_engine_state(self, k: int) -> Path:
        """Online mode under DeepSpeed: the online D's engine checkpoint beside the fine-tune's resume
        state."""
        latest = self.diffusion_checkpoint(k, "latest")
        return latest.with_name(latest.stem + ".discriminator.deepspeed")

    def fake_score_engine_state(self, k: int) -> Path:
        """Distribution matching under DeepSpeed: the fake score's engine checkpoint beside the fine-tune's
        resume state."""
        latest = self.diffusion_checkpoint(k, "latest")
        return latest.with_name(latest.stem + ".fake_score.deepspeed")

    @property
    def pipeline(self) -> Path:
        """The run's result (the last iteration's continue_from checkpoint) as a diffusers pipeline folder."""
        return self.root / "pipeline"

    @property
    def checkpoint_folder(self) -> Path:
        return self.root / "checkpoints"

    def found_diffusion_checkpoints(self, tag: str) -> dict[int, Path]:
        """iteration -> its `tag` checkpoint, for every one in the folder, whatever the experiment's name."""
        import re

        found = {}
        for path in self.checkpoint_folder.glob(f"*_iter_*_checkpoint_{tag}.pt"):
            m = re.fullmatch(rf".+_iter_(\d+)_checkpoint_{tag}\.pt", path.name)
            if m:
                found[int(m.group(1))] = path
        return found

    def diffusion_checkpoint(self, k: int, tag: str) -> Path:
        """Iteration k's fine-tuned diffusion export; "latest" also carries the resume state."""
        return self.checkpoint_folder / f"{self.name}_iter_{k}_checkpoint_{tag}.pt"

    def finetune_history(self, k: int) -> Path:
        return self.root / f"{self.name}_metrics_iter_{k}.csv"

    @property
    def summary(self) -> Path:
        return self.root / f"{self.name}_summary.csv"

    @staticmethod
    def name_in(folder: Path) -> str | None:
        """The experiment name of a run folder, read off the files stage 2 writes (None before it wrote
        any)."""
        import re

        folder = Path(folder)
        for pattern, regex in (
            (RunLayout.SUMMARY_GLOB, r"(.+)_summary\.csv"),
            ("samples/*_stage1.png", r"(.+)_stage1\.png"),
            ("*_metrics_iter_*.csv", r"(.+)_metrics_iter_\d+\.csv"),
            ("checkpoints/*_iter_*_checkpoint_*.pt", r"(.+)_iter_\d+_checkpoint_\w+\.pt"),
        ):
            for path in sorted(folder.glob(pattern)):
                m = re.fullmatch(regex, path.name)
                if m:
                    return m.group(1)
        return None

    def iterations_in(self) -> list[int]:
        """The stage-2 iterations that left anything in the folder (an iteration folder, history or grid)."""
        import re

        ks = set()
        for pattern, regex in (
            ("discriminator_iter_*", r"discriminator_iter_(\d+)"),
            (f"{self.name}_metrics_iter_*.csv", r".+_metrics_iter_(\d+)\.csv"),
            (f"samples/{self.name}_iter_*.png", r".+_iter_(\d+)\.png"),
        ):
            for path in self.root.glob(pattern):
                m = re.fullmatch(regex, path.name)
                if m:
                    ks.add(int(m.group(1)))
        return sorted(ks)

    @staticmethod
    def summaries_in(folder: Path) -> list[Path]:
        """The quality summaries in a run folder whose experiment name is not known."""
        return sorted(Path(folder).glob(RunLayout.SUMMARY_GLOB))

    def grid(self, k: int) -> Path:
        return self.root / "samples" / f"{self.name}_iter_{k}.png"

    @property
    def comparison(self) -> Path:
        """Grids from the same seeds (comparison_panels): stage 1 at stage 2's K steps, stage 2 at each step
        count it trained at, stage 1 at full steps."""
        return self.root / "samples" / f"{self.name}_comparison.png"

    @property
    def comparison_captions(self) -> Path:
        """The comparison picture's panel captions, left to right (JSON list), for the report."""
        return self.root / "samples" / f"{self.name}_comparison.json"

    @property
    def start_grid(self) -> Path:
        """The stage-1 model sampled as stage 2 samples (generation_steps), from the grids' fixed seeds."""
        return self.root / "samples" / f"{self.name}_stage1.png"

    @property
    def teacher_summary(self) -> Path:
        """The teacher (the stage-1 model at training.sample_steps) measured as the summary's rows are: one
        row (trainer/cli/teacher.py). Not named *_summary.csv: SUMMARY_GLOB finds the run's summary."""
        return self.root / "teacher_quality.csv"

    @property
    def companion(self) -> Path:
        """The demo's one-step companion run folder beside this few-step run's files (may not exist)."""
        return self.root / self.COMPANION

    def reference_stats(self, space: str) -> Path:
        return reference_stats_of(self.summary, space)

    @property
    def classifier(self) -> Path:
        """Where `advdiff classifier` writes unless told (the demo's stage2.metric_features names it)."""
        return self.root / "classifier.pt"

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

    @property
    def report(self) -> Path:
        """The run's one self-contained page (trainer/quality/report.py)."""
        return self.root / "report.html"

    def guide(self, stage2: bool = True) -> list[tuple[str, str]]:
        """(path relative to the root, what it holds) for the main outputs; "*" stands for an iteration."""
        rows = [
            (self.autoencoder_folder, "frozen AE (diffusers folder)"),
            (self.stage1_checkpoint("best"), "stage-1 diffusion checkpoint"),
            (self.stage1_grid, "decoded sample grid"),
            (self.config, "the config of every stage"),
            (self.classifier, "the digit classifier behind the summary's cls_* columns"),
        ]
        if stage2:
            rows += [
                (self.iteration_folder("*"), "per iteration: latents, D and its history"),
                (self.diffusion_checkpoint("*", "{best,latest}"), "fine-tuned diffusion checkpoints"),
                (self.finetune_history("*"), "fine-tune validation history"),
                (self.summary, "quality per iteration (row 0: stage 1)"),
                (self.reference_stats("*"), "held-out reals' feature statistics (mu, sigma) per space"),
                (self.teacher_summary, "the teacher (stage 1 at full steps), measured like the summary"),
                (self.grid("*"), "decoded grid per stage-2 iteration"),
                (self.start_grid, "the stage-1 model sampled like the iterations' grids"),
                (
                    self.comparison,
                    "few-step demo: stage 1 at K | stage 2 at each trained K | stage 1 at full",
                ),
                (self.report, "one page with all of it (open in a browser)"),
            ]
        return [
            (str(path.relative_to(self.root)) + ("/" if path.suffix == "" else ""), what)
            for path, what in rows
        ]


def reference_stats_of(summary_csv: Path, space: str) -> Path:
    """Beside the quality summary: the held-out reals' statistics (npz: mu, sigma) in one feature space
    (latent, pixel, cls, inception)."""
    return Path(summary_csv).parent / f"reference_{space}.npz"


def picture_of(csv_path: Path) -> Path:
    """The picture drawn from a CSV lies beside it."""
    return Path(csv_path).with_suffix(".png")


def comparison_panels(stage2: dict, full_steps) -> list[tuple[str, int]]:
    """The comparison picture's panels, left to right, as (model, DDIM steps): stage 1 at stage 2's
    generation_steps K, the result at each step count it trained at (stage2.train_steps, ascending; K
    without them), stage 1 at `full_steps`. `stage2`: the config's stage2 section as a dict."""
    k = stage2.get("generation_steps")
    trained = sorted(set(stage2.get("train_steps") or [k]))
    return [("stage 1", k), *(("stage 2", x) for x in trained), ("stage 1", full_steps)]
