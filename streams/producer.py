"""The faust producer with the fix that keeps a queued record from waiting for metadata nobody asks for.

aiokafka 0.14 (``client.py`` ``_wait_on_metadata``, unchanged upstream at 0.14.0) adds a topic to
the client's tracked topics (``client._topics``, the list every metadata refresh asks for) only
when its partitions are unknown. A producer that learnt a topic from an all-topics refresh (faust
refreshes after creating its changelog topics; the tracked list is empty until then) sends to it
without ever tracking it. The first send to a topic the producer has not seen yet (a changelog
the broker did not show at that refresh) then tracks that one topic alone, the next refresh asks
for it only, and ``ClusterMetadata.update_metadata`` replaces every partition it knew with the
answer: the other topics have no leader any more. A record already queued for one of them stays
in the accumulator (the sender refreshes the same narrow list, again and again) until another
send to its topic tracks it, or until the batch expires after ``producer_request_timeout`` (20
minutes in faust). The router sends nothing more until its batch is confirmed, so its records
waited out the 60 s delivery timeout and the worker exited with 70, while the scorer's sends
(their topics re-tracked by their next sends) went through. Seen on a fresh broker in the demo
under load; reproduced deterministically in ``tests/unit/test_producer_metadata.py``.

The fix: the producer's metadata is never narrowed. A send to a topic the metadata does not
know yet first waits for one all-topics refresh, so aiokafka has no reason to track it (and to ask
for it alone); every refresh keeps asking for all topics, and the changelogs faust's web router
looks up (``key_partition``, never sent to by a worker that only serves reads) stay known too.
(Tracking only the topics sent to, the first version of this fix, dropped those: ``GET
/users/<id>`` failed with a ``TypeError`` in aiokafka's partitioner on a restarted worker.) Where
something else already made the client track topics, a new topic is added to that list.

In: faust's ``app``. Out: its transport creates ``ShopstreamProducer``, whose aiokafka producer
is a ``TrackingAIOKafkaProducer``.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers.aiokafka import Producer


async def known_without_narrowing(client: Any, topic: str) -> None:
    """Make ``topic``'s partitions known before a send, without narrowing the metadata."""
    if client._topics:  # already tracking a list: keep this topic on it
        if topic not in client._topics:
            client.add_topic(topic)  # returns a future of the refresh it schedules; nothing waits
    elif client.cluster.partitions_for_topic(topic) is None:
        await client.force_metadata_update()  # all topics, this one included once it exists


class TrackingAIOKafkaProducer(aiokafka.AIOKafkaProducer):  # type: ignore[misc]
    """An aiokafka producer whose metadata is never narrowed (see the module docstring)."""

    async def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        await known_without_narrowing(self.client, topic)
        return await super().send(topic, *args, **kwargs)


class ShopstreamProducer(Producer):  # type: ignore[misc]
    """faust's aiokafka producer, creating ``TrackingAIOKafkaProducer`` instances."""

    @property
    def _producer_type(self) -> type[aiokafka.AIOKafkaProducer]:
        return TrackingAIOKafkaProducer


def install(app: Any) -> None:
    """Make ``app`` create its producer from ``ShopstreamProducer`` (before ``app.producer`` is
    first used)."""
    if app._producer is not None:
        raise RuntimeError("install the producer before app.producer is first used")
    app.transport.Producer = ShopstreamProducer
