"""The inputs of the GPU runs, built on the CPU machine and split into pieces that the device tool can carry.

    python benchmarks/gpu/gpu_pack_inputs.py --output /tmp/kdq_inputs                  # here: build, split, print the calls
    python benchmarks/gpu/gpu_pack_inputs.py --reassemble /tmp/kdq_inputs/pieces       # there: verify, join, unpack
    python benchmarks/gpu/gpu_pack_inputs.py --smoke --teacher TINY_FOLDER --output DIR --no-wheels   # a CPU check

The GPU machine has torch, transformers and accelerate but no soundfile, soxr or datasets, and a call carries at
most 64 MiB. So the speech travels as what training and decoding consume, log-mel features and token labels,
computed here exactly as ``results_table.py``'s trained rows compute them (``compress.training_data`` and
``prepare_dataset`` for training; the feature extractor, as ``evaluation.transcribe`` runs it, for ``dev.jsonl``).

OUTPUT/inputs/ (what ``gpu_train.py --inputs`` reads):

* ``teacher/``: the teacher (``--teacher``, a ``load_whisper`` source) as an fp16 HF folder (``save_whisper``);
  ``tiny/`` likewise for ``--tiny`` when given.
* ``speech.safetensors``: per split (``train``, ``eval``), the features of every row in float16, concatenated
  along time. Trailing frames equal to a row's last frame (the padding of audio shorter than 30 s) are dropped and
  restored from that frame on reading: lossless, and half the bytes of 16-bit PCM. Train rows carry their labels.
* ``manifest.json``: what is in it (sources, row ids, corpora, languages, reference texts, durations, sizes).

OUTPUT/pieces/ (what the device tool carries): ``inputs.tar.000``, ``.001``, ... (an uncompressed tar of
inputs/ cut into ``--piece_mb`` pieces, as ``split`` cuts; fp16 features and weights do not compress),
``wheels/`` (what our package imports and the GPU image lacks, pinned to the versions installed here, downloaded
for the GPU's Python) and ``pieces.json`` (bytes and SHA-256 of every piece, wheel and of the whole archive, and
the plan of which files to carry in which device call). ``--reassemble`` needs only the standard library: it
checks every hash first and names the missing or corrupted pieces, then streams the pieces into the tar reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The CPU benchmarks this GPU tooling builds on (results_table, step_time) live one folder up.
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "speech"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
ARCHIVE = "inputs.tar"
PIECES_FILE = "pieces.json"
SPEECH_FILE = "speech.safetensors"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "eval")
# What `import hf_whisper_kdq` needs at top level (datasets, soundfile, soxr, jiwer), what scoring needs (opencc,
# cn2an, whisper-normalizer's spelling table) and save_compressed (compressed-tensors), with their requirements,
# less what the GPU image ('cuda', .library/device/KINDS.md) already holds.
WHEELS = (
    "datasets",
    "dill",
    "multiprocess",
    "soundfile",
    "cffi",
    "pycparser",
    "soxr",
    "jiwer",
    "rapidfuzz",
    "opencc-python-reimplemented",
    "cn2an",
    "proces",
    "whisper-normalizer",
    "compressed-tensors",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "loguru",
)
# pip matches manylinux tags exactly: these are the ones the wheels above are published under.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
SAMPLING_RATE = 16000
CHUNK = 1 << 20


@dataclass
class PackArguments:
    """What to pack for the GPU, or which pieces to reassemble there (``HfArgumentParser``)."""

    output: str = field(
        default="/tmp/kdq_inputs", metadata={"help": "folder to build inputs/ and pieces/ in (keep it out of the repo)"}
    )
    reassemble: str | None = field(
        default=None,
        metadata={
            "help": "instead of building: verify the pieces in this folder against its pieces.json, join and unpack "
            "them into --into"
        },
    )
    into: str | None = field(
        default=None, metadata={"help": "where --reassemble unpacks the inputs (default: DIR/../inputs)"}
    )
    teacher: str = field(default="openai/whisper-base", metadata={"help": "the teacher, any load_whisper source"})
    tiny: str | None = field(
        default=None,
        metadata={"help": "also pack this model as tiny/ (e.g. openai/whisper-tiny.en) for a reference row"},
    )
    data: str = field(default=str(DEFAULT_DATA), metadata={"help": "folder with dev.jsonl and unlabeled.jsonl"})
    results: str = field(
        default=str(DEFAULT_RESULTS),
        metadata={
            "help": "results_table.py's output folder, whose cache/ holds the teacher labels (shared with its trained "
            "rows, so that both train on the same labels)"
        },
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "dev.jsonl utterances per corpus (default: all, as the results table)"}
    )
    train_rows: int | None = field(
        default=None, metadata={"help": "teacher-labelled LibriSpeech utterances (default: all of unlabeled.jsonl)"}
    )
    synthetic_rows: int = field(default=120, metadata={"help": "synthetic training utterances (0: none)"})
    synthetic_text: str | None = field(
        default=None,
        metadata={"help": "id<TAB>text file to synthesize them from (results_table.py's --synthetic_text)"},
    )
    label_batch_size: int = field(default=16, metadata={"help": "batch size of the teacher's labelling"})
    smoke: bool = field(
        default=False,
        metadata={
            "help": "pack a few rows of random noise with fixed texts instead of the shared speech (a CPU check of "
            "the pipeline; pair it with a tiny --teacher folder)"
        },
    )
    piece_mb: float = field(
        default=60.0, metadata={"help": "largest piece in MB (1e6 bytes; with the repo, under a call's 64 MiB)"}
    )
    wheels: bool = field(
        default=True,
        metadata={"help": "download the wheels of WHEELS for the GPU (needs the package registry; --no-wheels: not)"},
    )
    python_version: str = field(default="3.12", metadata={"help": "the GPU image's Python, for the wheels"})
    carry_link: str = field(
        default="benchmarks/results/gpu_pieces",
        metadata={"help": "ignored path in the repo that links to OUTPUT/pieces, used in the printed carry lists"},
    )

    def __post_init__(self):
        for name in ("eval_limit", "train_rows", "label_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        if self.piece_mb <= 0 or self.synthetic_rows < 0:
            raise ValueError("--piece_mb must be > 0 and --synthetic_rows >= 0")


def parse_args(argv=None) -> PackArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PackArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


# ---- features: trimmed fp16 in one tensor per split ------------------------------------------------------------------
def kept_frames(features) -> int:
    """Frames up to the last one that differs from the final frame: the rest repeats it and is restored on reading."""
    same = (features == features[:, -1:]).all(dim=0)
    differing = (~same).nonzero()
    return int(differing[-1]) + 1 if len(differing) else 1


class SplitWriter:
    """Collects one split's rows; ``tensors()`` gives its entries of speech.safetensors, ``rows`` its metadata."""

    def __init__(self, name: str):
        self.name, self.rows, self.chunks, self.fills, self.frames, self.labels = name, [], [], [], [], []

    def add(self, features, meta: dict, labels=None) -> None:
        import torch

        half = torch.as_tensor(features, dtype=torch.float32).to(torch.float16)
        kept = kept_frames(half)
        self.chunks.append(half[:, :kept].clone())
        self.fills.append(half[:, -1].clone())
        self.frames.append(kept)
        if labels is not None:
            self.labels.append([int(token) for token in labels])
        self.rows.append(meta)

    def tensors(self) -> dict:
        import torch

        out = {
            f"{self.name}.features": torch.cat(self.chunks, dim=1).contiguous(),
            f"{self.name}.fill": torch.stack(self.fills),
            f"{self.name}.frames": torch.tensor(self.frames),
        }
        if self.labels:
            out[f"{self.name}.labels"] = torch.tensor([t for row in self.labels for t in row], dtype=torch.int32)
            out[f"{self.name}.label_lengths"] = torch.tensor([len(row) for row in self.labels])
        return out


class PackedSplit:
    """One split of speech.safetensors as a map-style dataset: row i is ``{"input_features": float32 [mels,
    frames] array, "labels": token ids}`` (labels only for train), what ``WhisperDataCollator`` batches."""

    def __init__(self, tensors: dict, name: str, rows: list[dict], total_frames: int):
        import torch

        self.rows, self.total_frames = rows, total_frames
        self.features, self.fill = tensors[f"{name}.features"], tensors[f"{name}.fill"]
        self.frames = tensors[f"{name}.frames"]
        self.starts = torch.cumsum(self.frames, 0) - self.frames
        self.labels = tensors.get(f"{name}.labels")
        if self.labels is not None:
            lengths = tensors[f"{name}.label_lengths"]
            self.label_starts, self.label_lengths = torch.cumsum(lengths, 0) - lengths, lengths

    def __len__(self) -> int:
        return len(self.rows)

    def features_of(self, index: int):
        start, kept = int(self.starts[index]), int(self.frames[index])
        full = self.fill[index][:, None].expand(-1, self.total_frames).clone()
        full[:, :kept] = self.features[:, start : start + kept]
        return full.float()

    def __getitem__(self, index: int) -> dict:
        row = {"input_features": self.features_of(index).numpy()}
        if self.labels is not None:
            start, length = int(self.label_starts[index]), int(self.label_lengths[index])
            row["labels"] = self.labels[start : start + length].tolist()
        return row


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))


def read_speech(folder: str | Path) -> dict[str, PackedSplit]:
    """The packed splits of an inputs folder: {"train": PackedSplit, "eval": PackedSplit}."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    tensors = load_file(str(Path(folder) / SPEECH_FILE))
    frames = manifest["features"]["frames"]
    return {name: PackedSplit(tensors, name, manifest["splits"][name]["rows"], frames) for name in SPLITS}


# ---- the speech: shared data (as results_table.py) or smoke noise ----------------------------------------------------
def shared_sources(args):
    """(teacher, processor, training manifest, evaluation manifest, notes) through results_table's Context."""
    import results_runners
    import results_table

    # Context reads only the data, teacher and labelling options; its arguments want a row to be named.
    table = results_table.TableArguments(
        rows="kdq-d2-u4",
        data=args.data,
        output=args.results,
        teacher=args.teacher,
        synthetic_rows=args.synthetic_rows,
        batch_size=args.label_batch_size,
        train_rows=args.train_rows or None,
        synthetic_text=args.synthetic_text or None,
        eval_limit=args.eval_limit or None,
    )
    ctx = results_runners.Context(table)
    teacher, processor = ctx.teacher()
    train, evaluation = ctx.training_data(), ctx.eval_set(english_only=False)
    return teacher, processor, train, evaluation, {"phase_seconds": ctx.timer.seconds}


SMOKE_TEXTS = {
    "en": ["hello world", "a short test sentence", "the quick brown fox", "one two three"],
    "zh": ["你好世界", "今天天气很好", "一二三四", "谢谢大家"],
}


def smoke_sources(args):
    """A few rows of low noise with fixed texts: English training rows, an English and a Mandarin eval corpus.
    Their lengths fit the teacher's input window, which a test's teacher may shorten to 1 s to run fast."""
    import numpy as np
    import soundfile

    from hf_whisper_kdq import load_whisper
    from hf_whisper_kdq.data import manifest_dataset

    rng = np.random.default_rng(0)
    teacher, processor = load_whisper(args.teacher)
    window = processor.feature_extractor.chunk_length

    def rows(prefix: str, corpora: dict[str, str], count: int):
        columns = {key: [] for key in ("id", "corpus", "language", "audio", "duration", "text")}
        for corpus, language in corpora.items():
            for i in range(count):
                seconds = min(1.0 + 0.5 * i, 0.8 * window)
                buffer = io.BytesIO()
                soundfile.write(
                    buffer, 0.05 * rng.standard_normal(int(seconds * SAMPLING_RATE)), SAMPLING_RATE, format="WAV"
                )
                texts = SMOKE_TEXTS[language]
                values = (
                    f"{prefix}-{corpus}-{i}",
                    corpus,
                    language,
                    {"bytes": buffer.getvalue(), "path": None},
                    seconds,
                    texts[i % len(texts)],
                )
                for key, value in zip(columns, values):
                    columns[key].append(value)
        return manifest_dataset(columns)

    return (
        teacher,
        processor,
        rows("train", {"smoke-train": "en"}, 6),
        rows("eval", {"smoke-en": "en", "smoke-zh": "zh"}, 3),
        {},
    )


def pack_speech(teacher, processor, train, evaluation, folder: Path) -> dict:
    """Features (+ labels) of both splits into folder/speech.safetensors; returns the manifest's speech entries."""
    from safetensors.torch import save_file

    from hf_whisper_kdq import prepare_dataset
    from hf_whisper_kdq.audio import load_audio

    # As results_runners.run_training prepares its rows: the same labels, the same dropped rows.
    prepared, report = prepare_dataset(train, processor, multilingual=bool(teacher.generation_config.is_multilingual))
    writers = {name: SplitWriter(name) for name in SPLITS}
    for row in prepared:
        meta = {key: row[key] for key in ("id", "corpus", "language", "duration", "text")}
        writers["train"].add(row["input_features"], meta, labels=row["labels"])
    extractor = processor.feature_extractor
    for row in evaluation:
        audio = load_audio(row["audio"], row_id=row["id"])
        if len(audio) > extractor.n_samples:
            raise ValueError(f"{row['id']} is longer than 30 s: gpu_train.py decodes single windows only")
        features = extractor([audio], sampling_rate=SAMPLING_RATE, return_tensors="np").input_features[0]
        meta = {key: row[key] for key in ("id", "corpus", "language", "text")}
        writers["eval"].add(features, {**meta, "duration": len(audio) / SAMPLING_RATE})
    tensors = {key: value for writer in writers.values() for key, value in writer.tensors().items()}
    save_file(tensors, str(folder / SPEECH_FILE))
    splits = {}
    for name, writer in writers.items():
        corpora = {}
        for meta in writer.rows:
            corpora[meta["corpus"]] = corpora.get(meta["corpus"], 0) + 1
        splits[name] = {
            "n_rows": len(writer.rows),
            "kept_frames": int(sum(writer.frames)),
            "corpora": corpora,
            "rows": writer.rows,
        }
    splits["train"]["preparation"] = report.summary()
    mels, frames = tensors["train.features"].shape[0], extractor.nb_max_frames
    return {
        "splits": splits,
        "features": {
            "mels": mels,
            "frames": frames,
            "dtype": "float16",
            "trimmed": "trailing frames equal to the last are restored from it",
        },
    }


def save_model(model, processor, source: str, folder: Path) -> dict:
    import copy

    from hf_whisper_kdq import save_whisper

    save_whisper(copy.deepcopy(model).half(), processor, folder)
    return {
        "source": source,
        "folder": folder.name,
        "dtype": "float16",
        "multilingual": bool(model.generation_config.is_multilingual),
    }


# ---- pieces ----------------------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class PieceWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into ``size``-byte files ``<stem>.000``, ``.001``, ..."""

    def __init__(self, folder: Path, stem: str, size: int):
        self.folder, self.stem, self.size = folder, stem, size
        self.whole, self.pieces, self._file, self._digest, self._left = hashlib.sha256(), [], None, None, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self.whole.update(view)
        while view:
            if self._left == 0:
                self._next()
            part = view[: self._left]
            self._file.write(part)
            self._digest.update(part)
            self._left -= len(part)
            view = view[len(part) :]
        return len(data)

    def _next(self) -> None:
        self._close_piece()
        name = f"{self.stem}.{len(self.pieces):03d}"
        self._file, self._digest, self._left = open(self.folder / name, "wb"), hashlib.sha256(), self.size
        self.pieces.append({"name": name})

    def _close_piece(self) -> None:
        if self._file is not None:
            self._file.close()
            self.pieces[-1].update(bytes=self.size - self._left, sha256=self._digest.hexdigest())
            self._file = None

    def close(self) -> None:
        self._close_piece()
        super().close()


class PieceReader(io.RawIOBase):
    """The pieces read back as one stream, hashed on the way."""

    def __init__(self, paths: list[Path]):
        self.paths, self.whole, self._file = list(paths), hashlib.sha256(), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._file is None:
                if not self.paths:
                    return 0
                self._file = open(self.paths.pop(0), "rb")
            count = self._file.readinto(buffer)
            if count:
                self.whole.update(memoryview(buffer)[:count])
                return count
            self._file.close()
            self._file = None


def split_inputs(inputs: Path, pieces: Path, piece_bytes: int) -> dict:
    """inputs/ as an uncompressed tar cut into pieces; returns the archive entry of pieces.json."""
    writer = PieceWriter(pieces, ARCHIVE, piece_bytes)
    with io.BufferedWriter(writer, CHUNK) as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        for path in sorted(inputs.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(inputs).as_posix(), recursive=False)
    return {
        "name": ARCHIVE,
        "bytes": sum(p["bytes"] for p in writer.pieces),
        "sha256": writer.whole.hexdigest(),
        "pieces": writer.pieces,
    }


def download_wheels(folder: Path, python_version: str) -> list[dict]:
    """WHEELS at the versions installed here (the ones the package is tested with), built for the GPU's Python."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pins = [f"{name}=={version(name)}" for name in WHEELS]
    except PackageNotFoundError as error:
        raise SystemExit(f"{error.name} is not installed here: pip install it, or pack with --no-wheels") from error
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(folder),
            *pins,
        ]
    )
    if done.returncode:
        raise SystemExit(
            f"pip could not download the wheels ({' '.join(pins)}): is the package registry reachable? "
            "Pack with --no-wheels if the GPU image already has them."
        )
    return [
        {"name": f"wheels/{p.name}", "bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.glob("*.whl"))
    ]


def carry_plan(archive: dict, wheels: list[dict], piece_bytes: int) -> list[list[str]]:
    """Files per device call, each call within ``piece_bytes``: the wheels (needed from the first call on, which
    runs the throughput benchmark) and pieces.json go first, with the smallest piece when it fits beside them."""
    first = [PIECES_FILE] + (["wheels"] if wheels else [])
    pieces = sorted(archive["pieces"], key=lambda p: p["bytes"])
    if pieces and pieces[0]["bytes"] + sum(w["bytes"] for w in wheels) <= piece_bytes:
        first.append(pieces.pop(0)["name"])
    return [first] + [[p["name"]] for p in sorted(pieces, key=lambda p: p["name"])]


def pack(args) -> int:
    from hf_whisper_kdq import load_whisper

    output = Path(args.output)
    inputs, pieces = output / "inputs", output / "pieces"
    for folder in (inputs, pieces):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    clock = time.perf_counter()
    if args.smoke:
        sources = smoke_sources(args)
    else:
        data = Path(args.data)
        if missing := [name for name in ("dev.jsonl", "unlabeled.jsonl") if not (data / name).is_file()]:
            print(f"the shared speech data is absent ({', '.join(missing)} not in {data}): pass --data, or --smoke")
            return 1
        sources = shared_sources(args)
    teacher, processor, train, evaluation, notes = sources
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(sys.argv),
        "smoke": args.smoke,
        "eval_limit_per_corpus": args.eval_limit,
        "train_rows": args.train_rows,
        "synthetic_rows": 0 if args.smoke else args.synthetic_rows,
        "synthetic_text": args.synthetic_text,
        **notes,
    }
    manifest.update(pack_speech(teacher, processor, train, evaluation, inputs))
    manifest["teacher"] = save_model(teacher, processor, args.teacher, inputs / "teacher")
    manifest["tiny"] = save_model(*load_whisper(args.tiny), args.tiny, inputs / "tiny") if args.tiny else None
    manifest["bytes"] = {
        path.name: sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else [path]))
        for path in sorted(inputs.iterdir())
    }
    (inputs / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    piece_bytes = int(args.piece_mb * 1e6)
    archive = split_inputs(inputs, pieces, piece_bytes)
    wheels = download_wheels(pieces / "wheels", args.python_version) if args.wheels else []
    calls = carry_plan(archive, wheels, piece_bytes)
    listing = {"archive": archive, "wheels": wheels, "calls": calls}
    (pieces / PIECES_FILE).write_text(json.dumps(listing, indent=1) + "\n")
    print(
        f"inputs: {inputs} ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in manifest['bytes'].items())}); "
        f"{manifest['splits']['train']['n_rows']} train rows, {manifest['splits']['eval']['n_rows']} eval rows; "
        f"{time.perf_counter() - clock:.0f} s"
    )
    print(
        f"pieces: {pieces}: archive {archive['bytes'] / 1e6:.1f} MB in {len(archive['pieces'])} pieces, wheels "
        f"{sum(w['bytes'] for w in wheels) / 1e6:.1f} MB ({len(wheels)})"
    )
    print(f"before the device calls: ln -sfn {pieces} {args.carry_link}")
    for number, names in enumerate(calls, 1):
        size = sum(
            entry["bytes"]
            for entry in archive["pieces"] + wheels
            if entry["name"] in names or entry["name"].split("/")[0] in names
        )
        carry = json.dumps([f"{args.carry_link}/{name}" for name in names])
        print(f"call {number}: carry {carry} ({size / 1e6:.1f} MB)")
    return 0


def reassemble(pieces: Path, into: Path) -> int:
    listing = json.loads((pieces / PIECES_FILE).read_text())
    archive = listing["archive"]
    missing, corrupted = [], []
    for entry in archive["pieces"] + listing["wheels"]:
        path = pieces / entry["name"]
        if not path.is_file():
            missing.append(entry["name"])
        elif path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            corrupted.append(entry["name"])
    if missing or corrupted:
        print(
            f"cannot reassemble {pieces}: missing {missing or 'none'}, corrupted (size or SHA-256) "
            f"{corrupted or 'none'}: carry those again",
            file=sys.stderr,
        )
        return 2
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    reader = PieceReader([pieces / entry["name"] for entry in archive["pieces"]])
    with io.BufferedReader(reader, CHUNK) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(into, filter="data")
    if reader.whole.hexdigest() != archive["sha256"]:
        shutil.rmtree(into)
        print("the joined archive's SHA-256 differs from pieces.json: pieces from different packs?", file=sys.stderr)
        return 2
    print(f"reassembled {len(archive['pieces'])} pieces ({archive['bytes'] / 1e6:.1f} MB) into {into}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reassemble:
        pieces = Path(args.reassemble)
        return reassemble(pieces, Path(args.into) if args.into else pieces.parent / "inputs")
    return pack(args)


if __name__ == "__main__":
    sys.exit(main())
