"""The console's secondary screens, pushed by the app (escape closes each).

* ``DivergenceScreen(fetch_dumps=None)``: replica divergence from ``app.model``; ``f``
  runs the key-level diff over the dumps ``fetch_dumps()`` returns.
* ``TasksScreen()``: the live task list from ``app.client``; ``s`` state filter, ``n``
  submit form, ``c`` cancel the selected task, ``r`` refresh now.
"""

from console.screens.divergence import NO_DUMP_MESSAGE, DivergenceScreen, FetchDumps, no_dumps
from console.screens.tasks import SubmitTaskForm, TasksScreen
from console.screens.reachability import Matrix, ReachabilityScreen, reachability_matrix
from console.screens.logs import LogsScreen

__all__ = ["DivergenceScreen", "FetchDumps", "NO_DUMP_MESSAGE", "SubmitTaskForm", "TasksScreen",
           "no_dumps"]
__all__ += ["Matrix", "ReachabilityScreen", "reachability_matrix"]
__all__ += ["LogsScreen"]
from console.screens.deploy import DeployScreen

__all__ += ["DeployScreen"]
