"""Concept-level and global explanations: TCAV, Network Dissection and feature visualisation,
and the procedural concept library they probe with (generated from a seed, no downloads).

- :func:`tcav`: how much a class depends on a human concept at a layer (Kim et al. 2018), with
  a t-test against random concepts; CAVs fitted on the device, saved and reused.
- :func:`dissect`: which concept each unit of a layer detects (Bau et al. 2017), IoU of
  thresholded activations with concept masks, batched on the device.
- :func:`visualize`: images that maximise channels, units, class logits or directions (the
  Lucid recipe), many objectives as one batch.
- :mod:`xai_serve.concepts.library`: the procedural concepts (colours, textures, shapes with
  pixel masks), concept sets from files, random sets and probe datasets.
"""

from __future__ import annotations

from xai_serve.concepts.dissection import (
    CategorySummary,
    Dissection,
    DissectionRow,
    dissect,
)
from xai_serve.concepts.library import (
    COLORS,
    ConceptSet,
    ProbeDataset,
    concept_category,
    concept_from_images,
    concept_names,
    load_probe_folder,
    probe_dataset,
    procedural,
    procedural_library,
    random_set,
)
from xai_serve.concepts.tcav import CAV, ConceptScore, TCAVResult, tcav
from xai_serve.concepts.visualize import (
    Channel,
    ClassLogit,
    Direction,
    Objective,
    StandardTransforms,
    Unit,
    Visualization,
    parse_objective,
    visualize,
)

__all__ = [
    "CAV",
    "COLORS",
    "CategorySummary",
    "Channel",
    "ClassLogit",
    "ConceptScore",
    "ConceptSet",
    "Direction",
    "Dissection",
    "DissectionRow",
    "Objective",
    "ProbeDataset",
    "StandardTransforms",
    "TCAVResult",
    "Unit",
    "Visualization",
    "concept_category",
    "concept_from_images",
    "concept_names",
    "dissect",
    "load_probe_folder",
    "parse_objective",
    "probe_dataset",
    "procedural",
    "procedural_library",
    "random_set",
    "tcav",
    "visualize",
]
