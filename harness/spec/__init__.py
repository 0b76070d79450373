"""Benchmark specs: YAML files in ``jobs/``, checked completely before anything starts.

    spec = load_spec("jobs/quickstart.yaml", ["train.epochs=2", "data.limit=20"])
    for backbone, method in spec.pairs():
        cfg = spec.train_for(backbone, method)        # global < backbone < method train keys
    sweep = load_spec("jobs/sweeps/lcam_quickstart.yaml", sweep=True).sweep

A bad spec raises ``SpecError`` listing *every* problem at once (the CLI prints
``SpecError.format()`` and exits 2)::

    jobs/vgg16.yaml: 2 problems; nothing was started.
      methods[2].name: unknown method 'score-cam'. Did you mean 'scorecam'? Available: ...
      evaluation.keep_fractions[2]: 15 is not a fraction in (0, 1]. To keep the top 15%, write 0.15.

The schema is declared once, as pydantic models: the sections (``sections``), the entries
and the top-level ``Spec`` (``schema``), the ``sweep`` section (``sweep``) and, per method
class, its parameters (``params``, from the ``Param`` declarations). Everything else is
derived from them: defaults, checks, problem messages (``problems``), the spec reference
(``spec_reference()``, README's "Spec reference"). The modules, in reading order:

- ``values``: field types (strict: an int is never a bool or a float; a float field accepts
  ints and scientific-notation strings such as '1e-4', which YAML 1.1 reads as strings) and
  the words of value problems, ``describe()``;
- ``sections``, ``schema``, ``sweep``, ``params``: the models;
- ``loader``: the YAML (repeated keys are problems), ``key=value`` overrides, ``load_spec``;
  ``includes``: ``include:`` of base specs, merged under the spec's own values;
- ``build``, ``entries``, ``rules``: validation, registry resolution and the rules that span
  sections; ``problems``: ``SpecError``, ``Report`` and pydantic errors in our words;
- ``reference``: the annotated YAML reference and the method parameter table.

Importing this package imports neither Ray nor MLflow (nor torch: the registries are
imported once a file's YAML has been read).
"""
from harness.spec.loader import load_spec
from harness.spec.problems import SpecError
from harness.spec.reference import method_params_rows, spec_reference
from harness.spec.schema import (BUILTIN_LISTS, SAFE_ID, SAFE_NAME, SCHEMA_VERSION,
                                 BackboneEntry, MethodEntry, Spec)
from harness.spec.sections import (DataSection, EvaluationSection, PresetSection, RaySection,
                                   SAFE_TAG, ShardingSection, StorageSection, TrackingSection,
                                   TrainSection)
from harness.spec.sweep import SchedulerSection, SweepSection
from harness.spec.values import describe

__all__ = [
    "load_spec", "SpecError", "Spec", "BackboneEntry", "MethodEntry", "TrainSection",
    "DataSection", "EvaluationSection", "PresetSection", "ShardingSection", "TrackingSection",
    "StorageSection", "RaySection", "SweepSection", "SchedulerSection", "SCHEMA_VERSION",
    "BUILTIN_LISTS", "SAFE_ID", "SAFE_NAME", "SAFE_TAG", "describe", "spec_reference",
    "method_params_rows",
]
