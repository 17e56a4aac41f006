"""A ``set_parameters`` request is one change: its changes are validated and applied together, or refused together.

The node's parameters constrain each other (min_depth < max_depth, per camera too; a task needs its model), and
its on-set callback checks a change against the current values merged with the values being set. rclpy's parameter
service, though, hands a SetParameters request to the node one parameter at a time (one
``set_parameters_atomically([p])`` each), so the callback never saw the rest of the request: from min 0.1 / max 4,
``{min_depth: 2, max_depth: 1}`` applied min_depth and refused max_depth; ``{min_depth: 150, max_depth: 200}``
refused min_depth (150 >= the current 4) and applied max_depth. ``ros2 param load`` sends a whole file that way.

:func:`apply_requests_whole` makes the node's ``~/set_parameters`` service apply the parameters of a request that
change a declared parameter's value in ONE ``set_parameters_atomically`` call: the callback sees them all, so a
valid combination is accepted whatever the order and the current values, and an invalid one (or one change that
rclpy refuses: wrong type, read-only) leaves every parameter as it was, each of their results carrying the reason.
The other parameters of the request (set to the value they have, or not declared) take rclpy's own one-by-one
path, so ``ros2 param load`` of a ``ros2 param dump`` still reports the read-only ``start_type_description_service``
as before instead of refusing the file. ``~/set_parameters_atomically`` already works on the whole request.
"""

from __future__ import annotations

from typing import Any

__all__ = ["apply_requests_whole"]


def apply_requests_whole(node: Any) -> bool:
    """Replace the handler of ``node``'s ``~/set_parameters`` service (see the module docstring); False when the
    node has no parameter services (``start_parameter_services=False``)."""
    from rcl_interfaces.msg import SetParametersResult
    from rcl_interfaces.srv import SetParameters
    from rclpy.exceptions import ParameterNotDeclaredException, ParameterUninitializedException
    from rclpy.parameter import Parameter

    service = next((s for s in node.services
                    if s.srv_type is SetParameters and s.srv_name.endswith("/set_parameters")), None)
    if service is None:
        return False
    one_by_one = service.callback  # rclpy's handler

    def changes_value(param: Parameter) -> bool:
        if not node.has_parameter(param.name):
            return False  # rclpy answers "not declared" for it alone
        try:
            current = node.get_parameter(param.name)
        except ParameterUninitializedException:  # declared without a value (camera.<name>.* overrides)
            return True
        return current.get_parameter_value() != param.get_parameter_value()

    def set_as_one(request: SetParameters.Request, response: SetParameters.Response) -> SetParameters.Response:
        params = [Parameter.from_parameter_msg(p) for p in request.parameters]
        changing = [i for i, p in enumerate(params) if changes_value(p)]
        if len(changing) <= 1:
            return one_by_one(request, response)
        try:
            result = node.set_parameters_atomically([params[i] for i in changing])
        except ParameterNotDeclaredException as err:  # undeclared meanwhile
            result = SetParametersResult(successful=False, reason=str(err))
        reason = result.reason
        if not result.successful:
            names = ", ".join(params[i].name for i in changing)
            reason = f"{reason} (one change with {names} of the same request: none of them was applied)"
        results = []
        for i, msg in enumerate(request.parameters):
            if i in changing:
                results.append(SetParametersResult(successful=result.successful, reason=reason))
            else:
                results += one_by_one(SetParameters.Request(parameters=[msg]), SetParameters.Response()).results
        response.results = results
        return response

    service.callback = set_as_one
    return True
