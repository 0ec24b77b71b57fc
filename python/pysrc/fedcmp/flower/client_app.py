"""The ClientApp: forwards the server's status queries and round tasks
to the site's long-lived process (``fedcmp.site``), which holds the
site's client node with its backbones loaded once. Flower starts a fresh
ClientApp process per message; this one only moves bytes.

Node config (``flower-supernode --node-config``): ``client-id`` (the
site's stable id), ``manifest`` (its pairs, JSONL or CSV), ``state-dir``
(its state between rounds), optional ``cache-dir``, ``llm`` (its decoder;
default the registry's SmolLM2 in its cache), ``vision`` (its CLIP/SigLIP
folder, where the run uses one), ``site-idle-timeout`` and ``misbehave``.
Backbones are never loaded from a path the server sends.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcmp.flower.codec import CONFIG, from_records, to_records
from fedcmp.site import SiteOptions, call_site

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    options = SiteOptions.from_node_config(dict(context.node_config))
    config = msg.content.config_records[CONFIG]
    backbones = str(config.get("backbones", ""))
    (status,) = call_site(options, ("status", str(config["settings"]), int(config["round"]), backbones))
    return Message(RecordDict({CONFIG: ConfigRecord({"status": status})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    options = SiteOptions.from_node_config(dict(context.node_config))
    config, arrays = from_records(msg.content)
    backbones = str(config.get("backbones", ""))
    header, reply_arrays = call_site(
        options, ("train", str(config["settings"]), str(config["header"]), arrays, backbones)
    )
    return Message(to_records({"header": header}, reply_arrays), reply_to=msg)
