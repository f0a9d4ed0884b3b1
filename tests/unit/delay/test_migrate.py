"""The pure parts of ``delay migrate``: the printed plan, what it reads from rabbitmqctl."""

from __future__ import annotations

from workers.delay.migrate import Binding, Plan, _table, delayed_count_expr, vhost_of


def plan(**overrides: object) -> Plan:
    fields: dict[str, object] = {
        "exchange": "orders",
        "vhost": "/",
        "delayed_type": "direct",
        "durable": True,
        "arguments": {"x-delayed-type": "direct", "alternate-exchange": "ae"},
        "target": "orders.due",
        "target_exists": False,
        "in_queue": "orders.delay",
        "delayed": 3,
        "outgoing": [
            Binding("orders", "billing", "queue", "created", {}),
            Binding("orders", "audit", "exchange", "#", {"x-match": "all"}),
        ],
        "incoming": [],
    }
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]


def test_the_steps_name_every_binding_and_what_waits_where():
    lines = plan().steps(wait=True)
    assert lines[0].endswith("the plugin holds 3 delayed message(s) for orders now")
    assert lines[1] == (
        "1. declare exchange orders.due (direct, durable, {'alternate-exchange': 'ae'}) and "
        "copy orders's 2 binding(s) onto it:"
    )
    assert lines[2:4] == [
        "   orders.due -> queue billing ('created')",
        "   orders.due -> exchange audit ('#' {'x-match': 'all'})",
    ]
    assert lines[5] == "3. wait until the plugin holds no message for orders"
    # direct: the plugin routes what it still holds at the swap by the keys X was bound with
    assert lines[6] == (
        "4. delete exchange orders (its bindings go with it: consumers now receive through "
        "orders.due) and at once declare it again (topic, durable), bind queue orders.delay "
        "to it '#', 'created'"
    )
    assert lines[7].startswith("5. count again: a message the plugin took for orders after")
    assert plan(delayed_type="topic").catch_keys == ["#"]
    assert plan().catch_keys == ["#", "created"]
    assert plan(target_exists=True).steps(wait=False)[1].startswith("1. keep exchange orders.due")
    assert plan().target_arguments == {"alternate-exchange": "ae"}


def test_rabbitmqctl_tables_and_the_vhost_of_the_url():
    assert _table([["x-delayed-type", "longstr", "topic"], ["n", "long", 5]]) == {
        "x-delayed-type": "topic",
        "n": 5,
    }
    assert _table([]) == {}
    assert vhost_of("amqp://u:p@h:5672/") == "/"
    assert vhost_of("amqp://u:p@h:5672") == "/"
    assert vhost_of("amqp://u:p@h/team%2Fa") == "team/a"


def test_the_count_expression_passes_names_as_bytes():
    expr = delayed_count_expr("/", "a'b\"")
    assert "list_to_binary([47])" in expr
    assert "list_to_binary([97,39,98,34])" in expr
    assert expr.endswith("end.")
