"""Offline pre-tokenization: every image of a split -> VQ codes once, stored as a TFDS dataset.

Output folder ``OUT`` (readable with ``tfds.builder_from_directory`` and as the ``pretokenized``
dataset of the input pipeline, which then yields ``image_ids`` instead of pixels)::

    pretokenize.json                      the job (dataset, resolution, text length, tokenizer and
                                          VQ fingerprints, ...); a resumed run must match it
    shards/<split>.json                   the split's plan: records, shards
    pretokenized-<split>.array_record-<i>-of-<n>   records: codes [h, w], text_ids [c, L],
                                          text_lengths [c], captions, image_id, index (in the
                                          source split), micro_conds [5], vqa/* when present
    shards/<split>-<i>.json               written after shard i: examples, bytes, skip counts
    features.json, dataset_info.json      TFDS metadata, (re)written whenever a split completes

Shard ``i`` covers source records ``[i * E, (i + 1) * E)`` and belongs to host ``i mod
process_count``; within a host, batches are split over the local devices by a jitted encode.
Every file is written to a temp name and renamed, and a shard whose sidecar exists is skipped, so
an interrupted job resumes where it stopped. Images are centre-cropped (no random crop: the
crop is baked into the codes, recorded in ``micro_conds``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from muddit_jax.data import schema, text
from muddit_jax.data.preprocess import DEFAULT_AESTHETIC, ImageError, load_image, to_unit
from muddit_jax.models import vq
from muddit_jax.models.tokenizers import Tokenizer

NAME = "pretokenized"
JOB_FILE = "pretokenize.json"
SHARD_DIR = "shards"
Encoder = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Job:
    """What fixes the output; stored in ``pretokenize.json`` and checked when resuming."""

    dataset: str
    options: dict[str, Any]
    resolution: int
    text_length: int
    tokenizer: str
    vq: str
    codes_shape: tuple[int, int]
    examples_per_shard: int = 1024
    aesthetic_score: float = DEFAULT_AESTHETIC

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str, sort_keys=True))


def read_job(out: str | os.PathLike) -> dict[str, Any]:
    path = Path(out).expanduser() / JOB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {out} is not a muddit-pretokenize output")
    return json.loads(path.read_text())


def vq_fingerprint(config: vq.VQConfig, params: Any) -> str:
    """Hash of the VQ config and every parameter's bytes."""
    h = hashlib.sha256(repr(config).encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def make_encoder(config: vq.VQConfig, params: Any, batch_size: int) -> Encoder:
    """``images uint8 [b, R, R, 3] -> codes int32 [b, h, w]`` with each batch (padded to a fixed
    size that divides evenly) split over this host's devices by one jitted encode."""
    devices = jax.local_devices()
    size = -(-batch_size // len(devices)) * len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    fn = jax.jit(lambda p, x: vq.encode(p, config, x), out_shardings=rows)

    def encode(images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.zeros((size, *images.shape[1:]), np.float32)
        padded[:n] = to_unit(images)
        return np.asarray(fn(params, jax.device_put(padded, rows)))[:n]

    return encode


def features(job: Job, vqa: bool) -> tfds.features.FeaturesDict:
    spec: dict[str, Any] = {
        "codes": tfds.features.Tensor(shape=tuple(job.codes_shape), dtype=np.int32),
        "text_ids": tfds.features.Tensor(shape=(None, job.text_length), dtype=np.int32),
        "text_lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "image_id": tfds.features.Text(),
        "index": np.int64,
        "micro_conds": tfds.features.Tensor(shape=(5,), dtype=np.float32),
    }
    if vqa:
        spec["vqa"] = schema.vqa_features()
    return tfds.features.FeaturesDict(spec)


def _template(out: Path, split: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=NAME, split=split,
                                         filetype_suffix="array_record")


def _write_json(obj: Any, path: Path) -> None:
    schema.write_bytes_atomic(json.dumps(obj, indent=1, sort_keys=True).encode(), path)


def _check_job(out: Path, job: Job) -> None:
    want = job.to_json()
    if (out / JOB_FILE).is_file():
        have = read_job(out)
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a different pre-tokenization job: (existing, requested)"
                             f" = {diff}; use another --out or the same settings")
    else:
        _write_json(want, out / JOB_FILE)


def _encode_shard(source: Sequence[Mapping[str, Any]], indices: range, job: Job,
                  encode: Encoder, tokenizer: Tokenizer, batch_size: int,
                  counter: schema.SkipCounter) -> list[dict[str, Any]]:
    """Records of ``indices`` (bad images / records without any text are counted and dropped)."""
    kept, pixels = [], []
    for i in indices:
        record = source[i]
        captions = schema.clean_captions(record.get("captions", ()))
        vqa = record.get("vqa")
        if not captions and not (vqa and len(vqa["question"])):
            counter.add("empty_caption", f"record {i}")
            continue
        try:
            image, micro = load_image(record["image"], job.resolution)
        except ImageError:
            counter.add("undecodable_image", f"record {i}")
            continue
        ids = (tokenizer.encode(captions, job.text_length) if captions
               else np.zeros((0, job.text_length), np.int32))
        out = {
            "text_ids": ids.astype(np.int32),
            "text_lengths": np.array([text.valid_mask(r, tokenizer.eos_id).sum() for r in ids],
                                     np.int32),
            "captions": captions,
            "image_id": schema.as_str(record["image_id"]),
            "index": i,
            "micro_conds": np.array([*micro, job.aesthetic_score], np.float32),
        }
        if vqa is not None:
            out["vqa"] = vqa
        kept.append(out)
        pixels.append(image)
    for start in range(0, len(kept), batch_size):
        codes = encode(np.stack(pixels[start : start + batch_size]))
        for record, c in zip(kept[start : start + batch_size], codes):
            record["codes"] = c.astype(np.int32)
    return kept


def _write_shard(records: list[dict[str, Any]], feats: tfds.features.FeaturesDict,
                 path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer, encode = ArrayRecordWriter(tmp, "group_size:1"), schema.RecordEncoder(feats)
        for record in records:
            writer.write(encode(record))
        writer.close()
        os.chmod(tmp, schema.FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def finalize(out: Path, feats: tfds.features.FeaturesDict) -> list[str]:
    """Write the TFDS metadata for every split whose shards are all done; returns those splits."""
    infos = []
    for plan_path in sorted((out / SHARD_DIR).glob("*.json")):
        if "-" in plan_path.stem:
            continue
        split, plan = plan_path.stem, json.loads(plan_path.read_text())
        sidecars = [out / SHARD_DIR / f"{split}-{i:05d}.json" for i in range(plan["num_shards"])]
        if not all(p.is_file() for p in sidecars):
            continue
        done = [json.loads(p.read_text()) for p in sidecars]
        infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[d["num_examples"] for d in done],
            num_bytes=sum(d["num_bytes"] for d in done), filename_template=_template(out, split)))
    if not infos:
        return []
    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(name=NAME, version=tfds.core.Version("1.0.0"),
                                          data_dir=os.fspath(out), module_name=""),
        description="VQ codes + token ids written by muddit-pretokenize.",
        features=feats,
    )
    info.set_file_format("array_record")
    info.set_splits(tfds.core.SplitDict(infos))
    with tempfile.TemporaryDirectory(dir=out, prefix=".meta-") as tmp:
        info.write_to_directory(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "dataset_info.json")
        for name in names:  # dataset_info.json last: its presence means "readable"
            os.replace(os.path.join(tmp, name), out / name)
    return [i.name for i in infos]


def pretokenize(source: Sequence[Mapping[str, Any]], split: str, out: str | os.PathLike, job: Job,
                encode: Encoder, tokenizer: Tokenizer, *, batch_size: int = 32,
                process_index: int | None = None, process_count: int | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Encode this host's unfinished shards of ``split``; returns a summary dict."""
    out = Path(out).expanduser()
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    _check_job(out, job)
    n, per = len(source), job.examples_per_shard
    num_shards = max(1, -(-n // per))
    _write_json({"num_records": n, "num_shards": num_shards}, out / SHARD_DIR / f"{split}.json")
    feats = features(job, vqa=bool(n) and "vqa" in source[0])
    template = _template(out, split)
    summary: dict[str, Any] = {"split": split, "num_shards": num_shards, "written": [],
                               "already_done": [], "skipped": {}}
    for shard in range(pi, num_shards, pc):
        sidecar = out / SHARD_DIR / f"{split}-{shard:05d}.json"
        if sidecar.is_file():
            summary["already_done"].append(shard)
            continue
        counter = schema.SkipCounter(f"pretokenize {split} shard {shard}")
        indices = range(shard * per, min(n, (shard + 1) * per))
        records = _encode_shard(source, indices, job, encode, tokenizer, batch_size, counter)
        path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
        size = _write_shard(records, feats, Path(path))
        _write_json({"num_examples": len(records), "num_bytes": size,
                     "skipped": dict(counter.counts)}, sidecar)
        summary["written"].append(shard)
        for k, v in counter.counts.items():
            summary["skipped"][k] = summary["skipped"].get(k, 0) + v
        log(f"muddit-pretokenize: {split} shard {shard + 1}/{num_shards}: {len(records)} "
            f"examples, {sum(counter.counts.values())} skipped")
    summary["complete_splits"] = finalize(out, feats)
    return summary
