# Input functions of workflow/rules/offload_tables.smk (Big-Layers Tables 1 and 2), bound to the plan
# of common.smk; what they compute is slidetrain.workflow.offload_table_jobs.
from slidetrain.workflow import offload_table_jobs as _offload_tables

OFFLOAD_TABLES_CFG = _offload_tables.offload_tables_cfg(PLAN)
OFFLOAD_TABLES = _offload_tables.offload_tables(PLAN)

try:
    _offload_tables.check_offload_tables(PLAN)
except SlidetrainError as err:  # a bad table block: its message, without a traceback
    raise WorkflowError(str(err))


def biglayers_params(wildcards):
    return _offload_tables.biglayers_params(PLAN, wildcards.dataset, wildcards.encoder, wildcards.agg, wildcards.aug)


def biglayers_test_splits(wildcards):
    return _offload_tables.biglayers_test_splits(PLAN, wildcards.dataset, wildcards.split)


def biglayers_tests(wildcards):
    return _offload_tables.biglayers_tests(PLAN, wildcards.dataset, wildcards.split)


def biglayers_modes(wildcards):
    return _offload_tables.biglayers_modes(PLAN, wildcards.dataset)


def offload_table_metrics(name):
    return _offload_tables.offload_table_metrics(PLAN, name)


def offload_table_args(name):
    return _offload_tables.offload_table_args(PLAN, name)
