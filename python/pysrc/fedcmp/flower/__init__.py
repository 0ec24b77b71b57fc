"""fedcmp on Flower: a transport over Flower's Grid for fedcmp's own round
loop (``transport``), the ServerApp (``server_app``) and the ClientApp
(``client_app``). The App in ``python/app`` points Flower at these two.

Messages: the server's status query is a QUERY message, a round task a
TRAIN message; each carries a ConfigRecord ``fedcmp`` (the run settings
and the task's JSON header, the array names in order) and an ArrayRecord
``arrays`` (float32 arrays, moved by Flower in chunks).
"""
