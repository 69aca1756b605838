# Source me: the environment liftoff's Airflow and the lab use from this checkout.
#   source scripts/env.sh            (after `make setup`; `python -m lab up` for the lab)
_liftoff_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export LIFTOFF_ROOT="$_liftoff_root"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$_liftoff_root/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$_liftoff_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_liftoff_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
# Stuck tasks (README): a task whose worker died is failed after 60 s without a heartbeat (not 300).
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="${AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT:-60}"
# A task's supervisor waits this long for the api-server before its task is killed (default 5 s).
export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export PYTHONPATH="$_liftoff_root/include:$_liftoff_root/plugins:$_liftoff_root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_liftoff_root/.venv/bin:$PATH"
export LIFTOFF_LAB_DIR="${LIFTOFF_LAB_DIR:-$_liftoff_root/.lab}"
# The lab writes its connections and inventory here once it is up.
if [ -f "$LIFTOFF_LAB_DIR/liftoff.env" ]; then . "$LIFTOFF_LAB_DIR/liftoff.env"; fi
unset _liftoff_root
