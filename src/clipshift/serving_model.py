"""The code MLflow stores with each clipshift classifier model ("models from code"): loading the
model runs this file, so no pickled Python object is stored or unpickled."""

from mlflow.models import set_model

from clipshift.serving import ClassifierModel

set_model(ClassifierModel())
