"""Public task names: any Celery producer (another service, another language) sends jobs by these names.

Each task takes one keyword argument, ``job``: the JSON form of its payload schema, and returns the JSON form
of its result schema (see :mod:`shared.schemas`).
"""

LOAD = "fleet.load"  # job: LoadJob -> ModelInfo
PREDICT = "fleet.predict"  # job: PredictJob -> PredictionResult
BATCH_PREDICT = "fleet.batch_predict"  # job: BatchPredictJob -> BatchPredictResult
UNLOAD = "fleet.unload"  # job: UnloadJob -> UnloadResult

#: Remote-control commands every worker of a pool answers (``app.control.broadcast(name, reply=True)``).
CONTROL_LIST_MODELS = "fleet_list_models"
CONTROL_HEALTH = "fleet_health"

ALL = (LOAD, PREDICT, BATCH_PREDICT, UNLOAD)
