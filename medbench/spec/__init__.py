"""The task-spec stage: YAML files -> validated specs (:mod:`.model`, :mod:`.loader`) and where tasks and
suites are found (:mod:`.catalog`). Later stages import from here."""

from medbench.spec.loader import load_with_includes, parse_suite_file, parse_task_file
from medbench.spec.model import (
    AttributeSpec,
    DatasetSpec,
    HyperRuleSpec,
    InputSpec,
    OODTargetSpec,
    ResolvedTask,
    ScoringSpec,
    SplitSpec,
    SuiteSpec,
    SuiteVariants,
    TaskSpec,
    VariantRuns,
    task_content_hash,
)

__all__ = ["AttributeSpec", "DatasetSpec", "HyperRuleSpec", "InputSpec", "OODTargetSpec", "ResolvedTask",
           "ScoringSpec", "SplitSpec", "SuiteSpec", "SuiteVariants", "TaskSpec", "VariantRuns",
           "load_with_includes", "parse_suite_file", "parse_task_file", "task_content_hash"]
