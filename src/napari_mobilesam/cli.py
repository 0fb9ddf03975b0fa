"""The ``napari-mobilesam`` command line.

Subcommands::

    napari-mobilesam segment STACK.tif --prompts prompts.csv -o labels.tif [--propagate]
    napari-mobilesam auto STACK.tif -o labels.tif
    napari-mobilesam distill --teacher sam_vit_h.pth --images data/ -o student.pt

Common options: ``--model``, ``--checkpoint``, ``--device``, ``--backend``, ``--z-range START:STOP``,
``--overwrite``, ``--no-progress``. Input stacks are read lazily (one TIFF page at a time) and the
labels are streamed into a compressed TIFF that keeps the input's resolution metadata, so stacks
larger than memory work. ``--dask-workers N`` runs slices on a local dask cluster of N worker
processes, ``--scheduler ADDRESS`` on an existing dask.distributed cluster (with ``--propagate``
the workers compute the slices' embeddings and this process follows the objects).

Exit codes (:data:`EXIT_CODES`): 0 done, 1 unexpected error, 2 usage error, 3 bad input (image,
prompts file, shapes), 4 output exists or cannot be written, 5 model or weights problem,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_MODEL = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_ERROR: "unexpected error (a bug: please report it with the message)",
    EXIT_USAGE: "bad command line",
    EXIT_INPUT: "bad input: unreadable image, wrong shape or bad prompts file",
    EXIT_OUTPUT: "output exists (use --overwrite) or cannot be written",
    EXIT_MODEL: "model, checkpoint or weights problem",
    EXIT_INTERRUPTED: "interrupted",
}

PROG = "napari-mobilesam"

__all__ = ["main", "console_main", "build_parser", "EXIT_CODES"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK",
                   help="input image or stack: TIFF ((Z, Y, X), (Y, X), RGB or with channels), an "
                   "OME-Zarr image (IMAGE.zarr), or a folder of TIFFs")
    p.add_argument("-o", "--output", required=True, metavar="LABELS.tif",
                   help="labels to write: a TIFF (compressed, uint32, the input's resolution "
                   "metadata) or an OME-Zarr label image (LABELS.zarr, with a pyramid, written slice "
                   "by slice); for a folder of stacks, a folder receiving NAME_labels.tif for each NAME.tif")
    p.add_argument("--level", type=int, default=0, metavar="N",
                   help="OME-Zarr input: segment resolution level N (0 = full resolution, default)")
    p.add_argument("--resume", action="store_true",
                   help="OME-Zarr output: continue one left unfinished by an interrupted run "
                   "(finished slices are kept)")
    p.add_argument("--tile", default="auto", metavar="PIXELS",
                   help="cut slices larger than PIXELS into overlapping tiles seen at full resolution "
                   "(default auto: 1024-pixel tiles for slices over 1536 pixels; 0: never)")
    p.add_argument("--halo", type=int, default=None, metavar="PIXELS",
                   help="overlap of the tiles on each inner side (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never done otherwise)")
    p.add_argument("--model", default="vit_t",
                   help="model name: vit_t (MobileSAM, default), vit_t_lm, vit_t_em_organelles, "
                   "vit_b_lm, vit_b_em_organelles (micro-sam), vit_b, vit_l, vit_h, vit_t_test")
    p.add_argument("--decoder", default=None, metavar="PATH",
                   help="micro-sam AIS decoder file (default: the model's own, if any)")
    p.add_argument("--semantics", default="auto", choices=("auto", "standard", "microsam"),
                   help="inference semantics (default: the model's; see docs/models.md)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (default: the model's downloaded weights)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--backend", default="auto", choices=("auto", "openvino", "torch", "eager"),
                   help="encoder backend (default: the fastest for the device)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "mixed", "bf16"),
                   help="encoder precision, also the AIS decoder's unless --ais-precision says "
                        "otherwise (default: auto; float32 for micro-sam models)")
    p.add_argument("--ais-precision", default="auto", choices=("auto", "fp32", "mixed", "bf16"),
                   help="AIS decoder precision of a micro-sam model on the CPU (default: auto, "
                        "the encoder's): mixed or bf16 run it faster where the CPU has bf16, at "
                        "the cost of micro-sam's exact labels (see docs/models.md)")
    p.add_argument("--z-range", default=None, metavar="START:STOP",
                   help="only slices START..STOP-1 (either end may be left out; negative counts from the end)")
    p.add_argument("--channel-axis", type=int, default=None, metavar="AXIS",
                   help="axis holding channels in a multichannel stack")
    p.add_argument("--normalize", default="auto", choices=("auto", "stack", "slice", "none", "microsam"),
                   help="intensity normalisation: auto (default: micro-sam's per-slice min/max for "
                        "micro-sam models, else one percentile range for the stack), stack, slice "
                        "(a range per slice), none (uint8 as is) or microsam")
    p.add_argument("--cache-mb", type=int, default=64, metavar="MB",
                   help="embedding cache budget in MiB (bounds memory; default 64)")
    p.add_argument("--eager-read", action="store_true",
                   help="read the whole input into memory first (default: one page at a time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="segment slices on a local dask cluster of N worker processes")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="segment slices on an existing dask.distributed scheduler (e.g. tcp://host:8786)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its ``segment``, ``auto`` and ``distill`` subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MobileSAM segmentation of microscopy stacks from the command line.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    seg = sub.add_parser(
        "segment",
        help="segment objects from point/box prompts in a CSV file",
        description="Segment each prompted object on the slices where it has prompts, or follow it "
        "through z with --propagate. The prompts CSV has columns z,row,col,label,object_id "
        "(label 1 positive, 0 negative; napari's (z, row, col) pixel order).",
    )
    _add_common(seg)
    seg.add_argument("--prompts", required=True, metavar="PROMPTS.csv",
                     help="CSV of point prompts (for a folder of stacks: a folder of NAME.csv)")
    seg.add_argument("--propagate", action="store_true",
                     help="follow each object from its prompted slices through the z range")

    auto = sub.add_parser(
        "auto",
        help="automatic instance segmentation, one id per object through z",
        description="Find objects without prompts, then stitch them through z. Modes: 'ais' "
        "(micro-sam models: the instance-segmentation decoder's maps and a seeded watershed), 'apg' "
        "(micro-sam models: one prompt per AIS instance decoded by SAM, filtered, NMS), 'grid' (any "
        "model: candidate points from blobs plus a coarse grid, masks filtered by predicted IoU and "
        "stability, NMS); 'auto' (default) is ais for a model with a decoder, else grid.",
    )
    _add_common(auto)
    from .volume.automatic import AutoParams

    d = AutoParams()
    auto.add_argument("--min-iou", type=float, default=d.min_iou, help="minimum predicted IoU of a mask")
    auto.add_argument("--min-stability", type=float, default=d.min_stability, help="minimum stability score")
    auto.add_argument("--min-area", type=int, default=d.min_area, help="smallest object, in pixels")
    auto.add_argument("--max-area-fraction", type=float, default=d.max_area_fraction,
                      help="largest object as a fraction of the slice")
    auto.add_argument("--min-distance", type=int, default=d.min_distance,
                      help="minimum distance between blob prompts (about the smallest object radius)")
    auto.add_argument("--grid", type=int, default=d.grid, help="points per side of the coarse grid (0: none)")
    auto.add_argument("--max-points", type=int, default=d.max_points,
                      help="most prompts decoded per slice (the strongest blobs first)")
    auto.add_argument("--points-per-batch", type=int, default=d.points_per_batch,
                      help="prompts per batched decoder call")
    auto.add_argument("--polarity", default=d.polarity, choices=("auto", "bright", "dark"),
                      help="objects brighter or darker than the background")
    auto.add_argument("--stitch-iou", type=float, default=d.stitch_iou,
                      help="minimum IoU between slices for one object id")
    auto.add_argument("--stitch-gap", type=int, default=d.stitch_gap,
                      help="slices an object may be missed on and keep its id")
    auto.add_argument("--stitch-regrow", type=float, default=d.stitch_regrow,
                      help="an object that shrank towards its end and grows again by this factor is a "
                      "new object (touching nuclei in z); 0: off")
    auto.add_argument("--min-contrast", type=float, default=d.min_contrast,
                      help="blob prompts: smallest contrast, in units of the slice's noise (lower for "
                      "faint objects)")
    auto.add_argument("--center-distance-threshold", type=float, default=0.5,
                      help="AIS (models with a decoder): seed threshold on centre distances")
    auto.add_argument("--boundary-distance-threshold", type=float, default=0.5,
                      help="AIS: seed threshold on boundary distances")
    auto.add_argument("--foreground-threshold", type=float, default=0.5,
                      help="AIS: foreground probability threshold")
    auto.add_argument("--min-size", type=int, default=None,
                      help="AIS/APG: smallest object, in pixels (default: AIS 0, APG 25)")
    auto.add_argument("--ais-tiling", default="auto", choices=("auto", "stitched", "blocks"),
                      help="AIS on tiled slices: stitched (micro-sam's: whole-slice maps and "
                      "watershed, about 50 bytes per pixel), blocks (tile by tile, memory bounded) "
                      "or auto (stitched up to 2048 x 2048 pixels, blocks beyond)")
    auto.add_argument("--mode", default="auto", choices=("auto", "ais", "apg", "grid"),
                      help="automatic mode (default auto: ais for a model with a decoder, else grid)")
    from .volume.apg import PROMPT_KINDS, APGParams

    a = APGParams()
    auto.add_argument("--apg-prompts", default=a.prompts, choices=PROMPT_KINDS,
                      help="APG: prompt each AIS instance with a point at its seed, its box, or both")
    auto.add_argument("--apg-min-iou", type=float, default=a.min_iou,
                      help="APG: minimum predicted IoU of a mask (0: keep all)")
    auto.add_argument("--apg-min-stability", type=float, default=a.min_stability,
                      help="APG: minimum stability score of a mask (0: keep all)")
    auto.add_argument("--nms-threshold", type=float, default=a.nms_threshold,
                      help="APG: masks overlapping a better one by more than this IoU are duplicates")
    auto.add_argument("--apg-multimask", action="store_true",
                      help="APG: ask SAM for three masks per prompt and keep the best-scored")
    auto.add_argument("--apg-refine", action="store_true",
                      help="APG: decode once more with each mask's box and keep those masks "
                           "(micro-sam's refine_with_box_prompts)")

    dist = sub.add_parser(
        "distill",
        help="distil a MobileSAM image encoder from a SAM teacher on your images",
    )
    from .distillation.command import configure_parser

    configure_parser(dist)
    return parser


def _error(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _classify(exc: BaseException) -> int:
    """Exit code for an exception raised by a run: by its class, never by its message."""
    from .errors import InputError, ModelError, OutputError

    if isinstance(exc, ModelError):
        return EXIT_MODEL
    if isinstance(exc, (OutputError, PermissionError)):
        return EXIT_OUTPUT
    if isinstance(exc, (InputError, ValueError, IndexError)):
        return EXIT_INPUT  # SliceSource and friends: shapes, dtypes, layouts
    return EXIT_ERROR


def _client(args) -> tuple[Any, Any]:
    """(client, cluster) for --dask-workers / --scheduler, else (None, None)."""
    if args.dask_workers is None and args.scheduler is None:
        return None, None
    from distributed import Client, LocalCluster

    if args.scheduler is not None:
        return Client(args.scheduler), None
    if args.dask_workers < 1:
        raise ValueError("--dask-workers needs at least 1 worker")
    cluster = LocalCluster(n_workers=args.dask_workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=":0")
    return Client(cluster), cluster


def _folder_jobs(args, src: Path, out: Path) -> list[tuple[Path, Path, Path | None]]:
    """One job per .tif/.tiff file of folder ``src``: NAME.tif -> OUT/NAME_labels.tif."""
    from .errors import InputError, OutputError

    segment = args.command == "segment"
    files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in (".tif", ".tiff"))
    if not files:
        raise InputError(f"folder {src} holds no .tif/.tiff files")
    if out.exists() and not out.is_dir():
        raise OutputError(f"with a folder of stacks, -o must be a folder; {out} is a file")
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise InputError(
                f"{by_stem[f.stem]} and {f} would both be written to {out / (f.stem + '_labels.tif')}; "
                "rename one of them (e.g. add _2 to its name) and run again"
            )
        by_stem[f.stem] = f
    prompts_dir = Path(args.prompts) if segment else None
    if segment and not prompts_dir.is_dir():
        raise InputError(
            f"with a folder of stacks, --prompts must be a folder holding one NAME.csv per "
            f"NAME.tif; {prompts_dir} is not a folder"
        )
    return [(f, out / f"{f.stem}_labels.tif", prompts_dir / f"{f.stem}.csv" if segment else None)
            for f in files]


def _jobs(args) -> list[tuple[Path, Path, Path | None]]:
    """(stack, output, prompts) for each input; every output is checked before any work."""
    from .errors import InputError
    from .io.stacks import check_output_path, is_zarr_path

    src, out = Path(args.stack), Path(args.output)
    if src.is_dir() and not is_zarr_path(src):
        jobs = _folder_jobs(args, src, out)
    else:
        if out.suffix.lower() not in (".tif", ".tiff", ".zarr"):
            raise InputError(f"output {out} must be a .tif/.tiff file or a .zarr store (-o LABELS.tif)")
        jobs = [(src, out, Path(args.prompts) if args.command == "segment" else None)]
    for stack, o, prompts in jobs:
        check_output_path(o, args.overwrite or args.resume, inputs=[stack] + ([prompts] if prompts else []))
    return jobs


def _run_one(args, stack: Path, out: Path, prompts_path: Path | None, model: Any, client) -> None:
    from . import batch
    from .io.images import open_image

    data, meta = open_image(stack, lazy=not args.eager_read, level=args.level)
    if isinstance(model, str) and (args.decoder or args.semantics != "auto"
                                   or args.ais_precision != "auto"):
        from .models.choice import ModelChoice

        model = ModelChoice.of(model, args.checkpoint, args.device, args.backend, args.precision,
                               decoder=args.decoder, semantics=args.semantics,
                               ais_precision=args.ais_precision)
    common = dict(
        model=model, checkpoint=args.checkpoint, device=args.device, backend=args.backend,
        precision=args.precision, z_range=args.z_range, channel_axis=args.channel_axis,
        normalize=args.normalize, out=out, overwrite=args.overwrite, metadata=meta,
        cache_bytes=args.cache_mb * 2**20, progress=not args.no_progress, tile=args.tile,
        halo=args.halo,
    )
    if args.channel_axis is None and getattr(meta, "channel_axis", None) is not None:
        common["channel_axis"] = meta.channel_axis  # an OME-Zarr image says which axis is "c"
    if args.command == "segment":
        from .errors import InputError, PromptError

        prompts = batch.read_prompts_csv(prompts_path)
        if args.propagate:  # with a cluster, the workers compute the embeddings
            run = batch.propagate_stack
            if args.resume:
                raise InputError("--resume does not apply to --propagate (objects are followed "
                                 "through the whole stack at once); rerun without it")
        else:
            run, common["resume"] = batch.segment_stack, args.resume
        try:
            run(data, prompts, client=client, **common)
        except PromptError as exc:
            if str(prompts_path) in str(exc):
                raise
            raise PromptError(f"{prompts_path}: {exc}") from None
    else:
        from .volume.automatic import AutoParams

        params = AutoParams(
            min_iou=args.min_iou, min_stability=args.min_stability, min_area=args.min_area,
            max_area_fraction=args.max_area_fraction, min_distance=args.min_distance,
            grid=args.grid, polarity=args.polarity, stitch_iou=args.stitch_iou,
            stitch_gap=args.stitch_gap, stitch_regrow=args.stitch_regrow,
            min_contrast=args.min_contrast, max_points=args.max_points,
            points_per_batch=args.points_per_batch,
        )
        from .volume.apg import APGParams
        from .volume.instance import AISParams

        seeds = dict(center_distance_threshold=args.center_distance_threshold,
                     boundary_distance_threshold=args.boundary_distance_threshold,
                     foreground_threshold=args.foreground_threshold)
        ais = AISParams(**seeds, min_size=args.min_size or 0, tiling=args.ais_tiling)
        apg = APGParams(**seeds, prompts=args.apg_prompts, min_iou=args.apg_min_iou,
                        min_stability=args.apg_min_stability, nms_threshold=args.nms_threshold,
                        multimask=args.apg_multimask, refine_with_boxes=args.apg_refine,
                        **({} if args.min_size is None else {"min_size": args.min_size}))
        batch.segment_stack_auto(data, params=params, client=client, ais_params=ais, resume=args.resume,
                                 mode=args.mode, apg_params=apg, **common)
    print(f"wrote {out}", file=sys.stderr)


def _check_numbers(args) -> None:
    """Refuse numeric options out of range before any work (InputError naming the flag)."""
    from .errors import InputError

    if args.cache_mb < 0:
        raise InputError(f"--cache-mb must be at least 0 (MiB of embedding cache), got {args.cache_mb}")
    if args.tile != "auto":
        try:
            args.tile = int(args.tile) or None
        except ValueError:
            raise InputError(f"--tile must be a number of pixels, auto or 0, got {args.tile!r}") from None
        if args.tile is not None and args.tile < 64:
            raise InputError(f"--tile must be at least 64 pixels (or 0: no tiles), got {args.tile}")
    if args.halo is not None and args.halo < 0:
        raise InputError(f"--halo must be at least 0 pixels, got {args.halo}")
    if args.level < 0:
        raise InputError(f"--level must be 0 (full resolution) or more, got {args.level}")
    if args.dask_workers is not None and args.dask_workers < 1:
        raise InputError(f"--dask-workers needs at least 1 worker, got {args.dask_workers}")
    if args.command == "auto":
        for flag in ("apg_min_iou", "apg_min_stability", "nms_threshold", "center_distance_threshold",
                     "boundary_distance_threshold", "foreground_threshold"):
            v = getattr(args, flag)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"--{flag.replace('_', '-')} must lie between 0 and 1, got {v}")
        if args.min_size is not None and args.min_size < 0:
            raise InputError(f"--min-size must be at least 0 pixels, got {args.min_size}")


def _check_mode(args) -> None:
    """``--mode ais|apg`` with a registry model that has no decoder (and no --decoder or
    --checkpoint that could bring one) is refused before the model loads or converts."""
    from .models.registry import MODELS

    mode = getattr(args, "mode", None)
    spec = MODELS.get(getattr(args, "model", None))
    if mode in ("ais", "apg") and spec is not None and spec.semantics != "microsam" \
            and not args.decoder and not args.checkpoint:
        from .batch.slices import no_decoder_error

        raise no_decoder_error(mode)


def _run(args) -> int:
    from . import batch
    from .models.choice import ModelChoice

    _check_numbers(args)
    _check_mode(args)
    jobs = _jobs(args)  # before any heavy work: outputs that exist stop the run here
    if len(jobs) > 1:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    client, cluster = _client(args)
    model: Any = args.model
    code = EXIT_OK
    try:
        for stack, out, prompts_path in jobs:
            try:
                if client is None and isinstance(model, str) and len(jobs) > 1:
                    # Many files: load the model once, when the first input has opened.
                    batch.open_stack(stack)
                    model = ModelChoice.of(model, args.checkpoint, args.device, args.backend,
                                           args.precision, decoder=args.decoder,
                                           semantics=args.semantics,
                                           ais_precision=args.ais_precision).load()
                _run_one(args, stack, out, prompts_path, model, client)
            except Exception as exc:  # noqa: BLE001
                if len(jobs) == 1:
                    raise
                c = _classify(exc)
                print(f"{PROG}: error: {stack}: {exc}", file=sys.stderr)
                code = code or c
                if c in (EXIT_MODEL, EXIT_ERROR):
                    raise  # the same for every file: stop here
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return code


#: Set when a run received SIGTERM or SIGINT (see :func:`_sigterm_as_interrupt`).
_INTERRUPTED = {"signal": None}


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a job scheduler's stop) ends a run like Ctrl-C: partial outputs are removed,
    locks released, exit 130. Both signals are noted (:data:`_INTERRUPTED`): an interruption that
    lands inside an import or a class definition reaches us as another exception (Python wraps a
    ``KeyboardInterrupt`` raised in ``__set_name__`` into a ``RuntimeError``, say), and it is still
    an interruption, not a bug to report."""
    def interrupt(signum, frame):
        _INTERRUPTED["signal"] = signum
        raise KeyboardInterrupt

    _INTERRUPTED["signal"] = None
    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    before_int = signal.getsignal(signal.SIGINT)
    if before_int is signal.default_int_handler:  # Ctrl-C as Python's default, but noted
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if before_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, before_int)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{PROG}: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-mobilesam`` console script; returns the exit code."""
    import warnings

    before = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # "napari-mobilesam: warning: ...", no source line
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = before


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command == "distill":
        from .distillation.command import run_cli

        return int(run_cli(args))
    try:
        with _sigterm_as_interrupt():
            return _run(args)
    except KeyboardInterrupt:
        return _error("interrupted; no output was written", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - turned into an exit code and a message
        if _INTERRUPTED["signal"] is not None:  # the interruption, wrapped by Python on its way up
            return _error("interrupted; no output was written", EXIT_INTERRUPTED)
        code = _classify(exc)
        if code == EXIT_ERROR:
            import traceback

            traceback.print_exc()
        return _error(str(exc) or type(exc).__name__, code)


def console_main() -> None:
    """The ``napari-mobilesam`` command (and ``python -m napari_mobilesam.cli``): :func:`main`, then
    exit with its code.

    After an interruption the process leaves through ``os._exit`` (output streams flushed, atexit
    handlers run first): CPython keeps one process-wide "unhandled KeyboardInterrupt" flag that an
    interruption landing in code run by a C extension (``PyRun_String``) sets even though the
    ``KeyboardInterrupt`` is caught later, and at exit it then kills the process with SIGINT instead
    of returning our code (status -2 instead of 130: seen when SIGTERM came during the first
    imports of a run).
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
