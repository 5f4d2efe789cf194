"""What a person or a tool finds next to a version's shards: a Hugging Face dataset card
(`README.md`) and MLCommons Croissant metadata (`croissant.json`), both made from the manifest.

The card's YAML front matter names the license (`publish.license`), the task, the size category
and one `default` config whose `data_files` are the version's shards as paths relative to its
folder (a union's reach into its parents' folders), so `datasets.load_dataset(<version folder>)`
reads it with no other argument. Croissant describes each shard (path, size, sha256) and each of
the five members a sample has in it. Both are written before the manifest, which lists them.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import yaml

from factory.framework import layout
from filters.rules import RULES

FILES = ("README.md", "croissant.json")
CROISSANT_SPEC = "http://mlcommons.org/croissant/1.0"
# Each member of a sample (`KEY.<suffix>`), its MIME type and what it is (docs/architecture.md, shard layout).
MEMBERS = (
    ("input.jpg", "image/jpeg", "x: the reference image of the subject"),
    ("target.jpg", "image/jpeg", "x~: the new image of the subject, following the instruction"),
    ("user.txt", "text/plain", "y: what the user typed"),
    ("assistant.txt", "text/plain", "y~: the assistant's answer (inferred intent and explanation)"),
    ("json", "application/json", "metadata: key, reference, instruction, generator, scores, round, version"),
)
# KEY.json's fields and their types (what `factory.dataset.publisher.sample_from_row` writes), declared
# in the card so a reader never infers them from a first shard: a union mixes bootstrap samples,
# whose generator `w` and `alpha` are null, with SID samples, whose are not.
META_FIELDS: dict[str, Any] = {
    "key": "string", "dataset": "string", "version": "string", "reference_id": "string",
    "reference_set": "string", "subject": "string", "domain": "string", "instruction": "string",
    "instruction_id": "string", "category": "string", "style": "string", "round": "int64",
    "generator": {"name": "string", "kind": "string", "checkpoint": "string", "steps": "int64",
                  "model": "string", "scale": "float64", "seed": "int64", "alpha": "float64", "w": "string"},
    "scores": {name: "float64" for name in RULES},
}
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))


def card_files(manifest: dict[str, Any]) -> dict[str, bytes]:
    """{file name in the version folder: bytes} for a manifest (before the manifest is written)."""
    return {"README.md": dataset_card(manifest).encode("utf-8"),
            "croissant.json": json.dumps(croissant(manifest), indent=2, sort_keys=True).encode("utf-8")}


def shard_paths(manifest: dict[str, Any]) -> list[str]:
    """Each shard as a path relative to the version's folder."""
    folder = layout.version_dir(manifest["dataset"], manifest["version"])
    return [posixpath.relpath(layout.shard(manifest["dataset"], manifest["version"], shard["path"]), folder)
            for shard in manifest["shards"]]


def size_category(samples: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if samples < bound), "n>100M")


def license_id(manifest: dict[str, Any]) -> str:
    """`publish.license` of the config the version was published with."""
    return (manifest.get("config") or {}).get("publish", {}).get("license", "other")


def front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "license": license_id(manifest),
        "task_categories": ["image-to-image", "text-generation"],
        "tags": ["image-customization", "cafe", "webdataset", "synthetic"],
        "size_categories": [size_category(manifest["samples"])],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": shard_paths(manifest)}]}],
        "dataset_info": {"config_name": "default", "features": sample_features()},
    }


def sample_features() -> list[dict[str, Any]]:
    """The members of a sample as Hugging Face `features` (the card's `dataset_info`)."""
    members = [("__key__", "string"), ("__url__", "string"), ("input.jpg", "image"), ("target.jpg", "image"),
               ("user.txt", "string"), ("assistant.txt", "string")]
    return [*({"name": name, "dtype": dtype} for name, dtype in members), feature("json", META_FIELDS)]


def feature(name: str, kind: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(kind, str):
        return {"name": name, "dtype": kind}
    return {"name": name, "struct": [feature(field, inner) for field, inner in kind.items()]}


def dataset_card(manifest: dict[str, Any]) -> str:
    yaml_text = yaml.safe_dump(front_matter(manifest), sort_keys=False)
    return f"---\n{yaml_text}---\n\n" + "\n".join(card_body(manifest)) + "\n"


def card_body(manifest: dict[str, Any]) -> list[str]:
    name = f"{manifest['dataset']}/{manifest['version']}"
    parents = ", ".join(map(str, manifest["parents"])) or "none"
    lines = [
        f"# {name}",
        "",
        "Training data for tuning-free, conversational image customization (CAFE): each sample is a",
        "reference image `x`, a new image `x~` of the same subject, what a user typed `y` and the",
        "assistant's answer `y~`, as five WebDataset members sharing a key:",
        "",
        *(f"- `KEY.{suffix}`: {meaning}" for suffix, _, meaning in MEMBERS),
        "",
        f"Kind `{manifest['kind']}`, {manifest['samples']} samples in {len(manifest['shards'])} shards, "
        f"made {manifest['created']} by cafe-factory {manifest.get('code_version') or ''}".rstrip() + ".",
        f"Parents: {parents}.",
        "",
        "## Filter",
        "",
        *(f"- {rule.label}: score >= {manifest['thresholds'][name]}"
          for name, rule in RULES.items() if name in (manifest.get("thresholds") or {})),
        "",
        "## Funnel",
        "",
        *(f"- {gate}: {count}" for gate, count in (manifest.get("funnel") or {}).items() if isinstance(count, int)),
        *(f"- rejected ({reason}): {count}"
          for reason, count in ((manifest.get("funnel") or {}).get("rejections") or {}).items()),
        "",
        "## Models",
        "",
        *(f"- {role}: `{json.dumps(model, sort_keys=True)}`" for role, model in (manifest.get("models") or {}).items()),
        "",
        "## Cost",
        "",
        *(f"- {stage}: {json.dumps(figures, sort_keys=True)}"
          for stage, figures in (manifest.get("cost") or {}).items()),
    ]
    if manifest.get("review"):
        review = manifest["review"]
        lines += ["", "## Human review", "", f"- reviewers: {review.get('reviewers')}",
                  f"- precision: {json.dumps(review.get('precision'))}",
                  f"- agreement: {json.dumps(review.get('agreement'))}"]
    if manifest.get("shards_superset"):
        lines += ["", "The shards also hold samples this version left out (its index lists the kept ones)."]
    return lines + ["", "Load it with `datasets.load_dataset(\"<this folder>\")` or `webdataset.WebDataset(shards)`;",
                    "`manifest.json` beside this card is the version's full record."]


def croissant(manifest: dict[str, Any]) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD: the shards as file objects, each member kind as a file set inside them."""
    shards = [{"@type": "cr:FileObject", "@id": f"shard-{n}", "name": f"shard-{n}", "contentUrl": path,
               "contentSize": f"{shard['bytes']} B", "encodingFormat": "application/x-tar", "sha256": shard["sha256"]}
              for n, (path, shard) in enumerate(zip(shard_paths(manifest), manifest["shards"]))]
    members = [{"@type": "cr:FileSet", "@id": f"members-{suffix}", "name": f"members-{suffix}",
                "containedIn": [{"@id": shard["@id"]} for shard in shards], "encodingFormat": mime,
                "includes": f"*.{suffix}", "description": meaning} for suffix, mime, meaning in MEMBERS]
    records = [{"@type": "cr:RecordSet", "@id": suffix, "name": suffix, "description": meaning,
                "field": [field(suffix, "file", "sc:Text", "filename"),
                          field(suffix, "content", "sc:ImageObject" if mime.startswith("image/") else "sc:Text",
                                "content")]}
               for suffix, mime, meaning in MEMBERS]
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_SPEC,
        "name": f"{manifest['dataset']}-{manifest['version']}",
        "description": f"CAFE customization quadruplets ({manifest['kind']}, {manifest['samples']} samples).",
        "version": "1.0.0",
        "license": license_id(manifest),
        "url": f"datasets/{manifest['dataset']}/{manifest['version']}",
        "datePublished": manifest["created"],
        "citeAs": "Conversational image customization assistant (CAFE) training data, cafe-factory.",
        "distribution": shards + members,
        "recordSet": records,
    }


def field(record: str, name: str, data_type: str, file_property: str) -> dict[str, Any]:
    return {"@type": "cr:Field", "@id": f"{record}/{name}", "name": name, "dataType": data_type,
            "source": {"fileSet": {"@id": f"members-{record}"}, "extract": {"fileProperty": file_property}}}


CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "dct": "http://purl.org/dc/terms/",
    "rai": "http://mlcommons.org/croissant/RAI/", "equivalentProperty": "cr:equivalentProperty",
    "samplingRate": "cr:samplingRate",
    "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet", "format": "cr:format",
    "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
    "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform",
}
