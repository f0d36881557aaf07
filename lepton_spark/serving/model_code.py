"""The served model as MLflow "models from code": MLflow runs this file to build the pyfunc model,
so nothing of it is pickled (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` loads it). lepton-spark
itself travels in the model's ``code_paths``, which MLflow puts on ``sys.path`` first."""

from mlflow.models import set_model

from lepton_spark.serving.pyfunc import TabularModel

set_model(TabularModel())
