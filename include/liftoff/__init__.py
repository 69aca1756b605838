"""liftoff: continuous deployment of GitLab Omnibus fleets, the GitLab.com way, on Airflow 3.

The engine is plain typed Python and needs no scheduler: ``liftoff.inventory``,
``liftoff.versions``, ``liftoff.settings``, ``liftoff.store``, ``liftoff.alerts``,
``liftoff.qa``, ``liftoff.metrics`` and the fleet modules. Import the submodule you need;
this package imports nothing heavy on its own.
"""

from liftoff.errors import LiftoffError

__version__ = "0.1.0"
__all__ = ["LiftoffError", "__version__"]
