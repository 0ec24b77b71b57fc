"""Sends back what it received (decoded and re-encoded by fedcmp's codec,
as a site's reply is)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcmp.flower.codec import from_records, to_records

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, arrays = from_records(msg.content)
    return Message(to_records({"header": str(config["header"])}, arrays), reply_to=msg)
