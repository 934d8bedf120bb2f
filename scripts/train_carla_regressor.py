"""The former name of carla_regressor_train.py (FDM's name), kept so existing commands work."""
import runpy, pathlib  # noqa: E401
runpy.run_path(str(pathlib.Path(__file__).with_name("carla_regressor_train.py")), run_name="__main__")
