//! Acks, coalesced: the jobs settled while the previous acks went out are acked together, the
//! run of them that starts at the oldest delivery still unsettled in one `basic.ack` with
//! `multiple` set, the others one by one.
//!
//! One ack per job is one frame for lapin to route through its I/O thread and one command for
//! the broker's channel process; under load most jobs end in delivery order, so most acks fold
//! into a few frames. A job that takes long never holds the acks of the jobs after it: those
//! are acked one by one, so their prefetch slots are free at once. `multiple` only ever covers
//! tags that are all settled with an ack: a delivery still in hand, or one being handed back
//! (`basic.nack`), stays out of every range until its own frame has gone.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lapin::Channel;
use lapin::options::BasicAckOptions;
use lapin::types::DeliveryTag;
use tokio::sync::{Notify, oneshot};

/// The acks of one consuming channel. Every delivery is registered ([`Acks::delivered`]) before
/// its handling starts, then either acked through [`Acks::ack`] or handed back by its own
/// `basic.nack` and then [`Acks::forget`]-ten.
#[derive(Clone)]
pub(super) struct Acks {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Delivered and not yet acked or handed back (the ones waiting in `ready` included).
    outstanding: BTreeSet<DeliveryTag>,
    /// Settled with an ack, waiting for the next flush; each with whom to tell.
    ready: Vec<(DeliveryTag, oneshot::Sender<Result<(), String>>)>,
    /// No more acks will come: the flusher ends after the last flush.
    closed: bool,
}

impl Acks {
    /// Starts the flusher of `channel`'s acks; it ends once [`Acks::close`] is called and
    /// everything ready was sent.
    pub(super) fn start(channel: Channel) -> Acks {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Notify::new() });
        let acks = Acks { shared };
        tokio::spawn(flush_until_closed(acks.clone(), channel));
        acks
    }

    /// Registers a delivery as it arrives (tags arrive in increasing order).
    pub(super) fn delivered(&self, tag: DeliveryTag) {
        self.state().outstanding.insert(tag);
    }

    /// Acks `tag`; returns once its frame went out with the others of its flush.
    pub(super) async fn ack(&self, tag: DeliveryTag) -> Result<(), String> {
        let (reply, sent) = oneshot::channel();
        {
            let mut state = self.state();
            if state.closed {
                return Err("the session's acks are closed".into());
            }
            state.ready.push((tag, reply));
        }
        self.shared.wake.notify_one();
        sent.await.unwrap_or_else(|_| Err("the ack flusher ended".into()))
    }

    /// `tag` was handed back with its own `basic.nack` (already sent): it is no longer the
    /// broker's to ack.
    pub(super) fn forget(&self, tag: DeliveryTag) {
        self.state().outstanding.remove(&tag);
    }

    /// No more acks: the flusher sends what is ready and ends.
    pub(super) fn close(&self) {
        self.state().closed = true;
        self.shared.wake.notify_one();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn flush_until_closed(acks: Acks, channel: Channel) {
    loop {
        acks.shared.wake.notified().await;
        let (plan, replies, closed) = {
            let mut state = acks.state();
            let ready = std::mem::take(&mut state.ready);
            let tags: Vec<DeliveryTag> = ready.iter().map(|(tag, _)| *tag).collect();
            let plan = AckPlan::of(&state.outstanding, tags);
            for (tag, _) in &ready {
                state.outstanding.remove(tag);
            }
            (plan, ready, state.closed)
        };
        let outcome = send(&channel, &plan).await;
        for (_, reply) in replies {
            let _ = reply.send(outcome.clone());
        }
        if closed && acks.state().ready.is_empty() {
            return;
        }
    }
}

/// Sends the plan's frames on `channel`, every one queued before any is waited for: after a
/// delivery that never settles (a range can no longer pass it) every ack is a single, and they
/// must not go out one round trip to lapin's I/O thread after another.
async fn send(channel: &Channel, plan: &AckPlan) -> Result<(), String> {
    let ranges = plan.multiple.map(|tag| (tag, true));
    let singles = plan.singles.iter().map(|tag| (*tag, false));
    let frames =
        ranges.into_iter().chain(singles).map(|(tag, multiple)| channel.basic_ack(tag, BasicAckOptions { multiple }));
    futures_util::future::try_join_all(frames).await.map(drop).map_err(|e| format!("settling a delivery failed: {e}"))
}

/// The frames that ack a set of settled deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct AckPlan {
    /// One `basic.ack` with `multiple`: acks every tag up to this one. Only set when every
    /// outstanding tag up to it is ready.
    pub multiple: Option<DeliveryTag>,
    /// Acked one by one (`multiple` unset).
    pub singles: Vec<DeliveryTag>,
}

impl AckPlan {
    /// Plans the acks of `ready` given the tags still `outstanding` (which include `ready`): the
    /// longest run of ready tags that starts at the oldest outstanding one goes in one range,
    /// the rest one by one. A ready tag that is not outstanding (not registered, or already
    /// settled) is acked alone, never inside a range.
    pub(super) fn of(outstanding: &BTreeSet<DeliveryTag>, mut ready: Vec<DeliveryTag>) -> AckPlan {
        ready.sort_unstable();
        ready.dedup();
        let run = outstanding.iter().zip(&ready).take_while(|(held, settled)| held == settled).count();
        match run {
            0 | 1 => AckPlan { multiple: None, singles: ready },
            _ => {
                let singles = ready.split_off(run);
                AckPlan { multiple: ready.last().copied(), singles }
            }
        }
    }

    /// Every tag this plan acks, given what was outstanding.
    #[cfg(test)]
    fn acked(&self, outstanding: &BTreeSet<DeliveryTag>) -> Vec<DeliveryTag> {
        let mut acked: Vec<DeliveryTag> = match self.multiple {
            Some(last) => outstanding.range(..=last).copied().collect(),
            None => Vec::new(),
        };
        acked.extend(&self.singles);
        acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(tags: &[DeliveryTag]) -> BTreeSet<DeliveryTag> {
        tags.iter().copied().collect()
    }

    #[test]
    fn jobs_settled_in_delivery_order_are_acked_in_one_range() {
        let plan = AckPlan::of(&set(&[3, 4, 5, 6]), vec![5, 3, 4]);
        assert_eq!(plan, AckPlan { multiple: Some(5), singles: vec![] });
    }

    #[test]
    fn a_job_still_in_hand_keeps_the_range_below_it_and_the_later_ones_go_alone() {
        let plan = AckPlan::of(&set(&[3, 4, 5, 6, 7]), vec![3, 4, 6, 7]);
        assert_eq!(plan, AckPlan { multiple: Some(4), singles: vec![6, 7] });
        let plan = AckPlan::of(&set(&[3, 4, 5]), vec![4, 5]);
        assert_eq!(plan, AckPlan { multiple: None, singles: vec![4, 5] }, "3 is still in hand");
    }

    #[test]
    fn a_lone_ack_is_a_plain_ack() {
        assert_eq!(AckPlan::of(&set(&[9]), vec![9]), AckPlan { multiple: None, singles: vec![9] });
    }

    proptest! {
        /// Whatever is outstanding and whichever of it is ready: exactly the ready tags are
        /// acked, each once, and a range never covers a tag still in hand.
        #[test]
        fn a_plan_acks_exactly_the_ready_tags(
            outstanding in proptest::collection::btree_set(1u64..200, 0..40),
            picks in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
            strays in proptest::collection::vec(1u64..400, 0..3),
        ) {
            let held: Vec<DeliveryTag> = outstanding.iter().copied().collect();
            let mut ready: Vec<DeliveryTag> = if held.is_empty() {
                Vec::new()
            } else {
                picks.iter().map(|i| *i.get(&held)).collect()
            };
            // Tags the flusher may see that are not (or no longer) outstanding.
            ready.extend(strays.iter().filter(|t| !outstanding.contains(t)));
            let plan = AckPlan::of(&outstanding, ready.clone());
            let mut acked = plan.acked(&outstanding);
            acked.sort_unstable();
            let mut expected = ready;
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(&acked, &expected, "acked exactly the ready tags, once each");
            if let Some(last) = plan.multiple {
                prop_assert!(outstanding.range(..=last).all(|t| expected.contains(t)));
                prop_assert!(!plan.singles.contains(&last));
            }
        }
    }
}

/// Review (branch review-acks): the flusher against a real RabbitMQ (127.0.0.1:5672), with the
/// timing forced, so that what the integration tests only hit by chance is hit every run.
#[cfg(test)]
mod review_flusher {
    use super::*;
    use futures_lite::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use std::time::Duration;

    /// The broker the integration tests use (`TEST_AMQP_URL`, as in tests/it/support).
    fn url() -> String {
        std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }
    const PATIENCE: Duration = Duration::from_secs(5);

    struct Setup {
        conn: Connection,
        queue: String,
        consume: Channel,
        consumer: lapin::Consumer,
    }

    async fn setup(n: usize, name: &str) -> Setup {
        let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let queue = format!("review-acks-{name}-{}-{nanos}", std::process::id());
        let ch = conn.create_channel().await.unwrap();
        // Exclusive: gone with this connection (the test process), even when the test fails.
        let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
        ch.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for i in 0..n {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let consume = conn.create_channel().await.unwrap();
        consume.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        let consumer = consume
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        Setup { conn, queue, consume, consumer }
    }

    /// The next `n` deliveries, each registered as the supervisor registers them.
    async fn receive(s: &mut Setup, acks: &Acks, n: usize) -> Vec<lapin::message::Delivery> {
        let mut deliveries = Vec::with_capacity(n);
        for _ in 0..n {
            let d = tokio::time::timeout(PATIENCE, s.consumer.next()).await.unwrap().unwrap().unwrap();
            acks.delivered(d.delivery_tag);
            deliveries.push(d);
        }
        deliveries
    }

    /// Acks `tags` at once: every ack is queued before the flusher runs (current-thread
    /// runtime), so they share one flush.
    async fn ack_together(acks: &Acks, tags: &[DeliveryTag]) {
        let all = futures_util::future::try_join_all(tags.iter().map(|tag| acks.ack(*tag)));
        tokio::time::timeout(PATIENCE, all).await.expect("the acks went out").unwrap();
    }

    /// Closes the consuming channel (its unacked deliveries go back to the queue) and returns
    /// the bodies that came back: waits for `expected` of them, then `QUIET` for any more.
    async fn came_back(s: Setup, acks: &Acks, expected: usize) -> Vec<String> {
        const QUIET: Duration = Duration::from_secs(1);
        acks.close();
        s.consume.close(200, "bye".into()).await.unwrap();
        let ch = s.conn.create_channel().await.unwrap();
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut back =
            ch.basic_consume(s.queue.as_str().into(), "".into(), no_ack, FieldTable::default()).await.unwrap();
        let mut bodies = Vec::new();
        loop {
            let wait = if bodies.len() < expected { PATIENCE } else { QUIET };
            match tokio::time::timeout(wait, back.next()).await {
                Ok(Some(Ok(d))) => bodies.push(String::from_utf8_lossy(&d.data).into_owned()),
                _ => break,
            }
        }
        ch.queue_delete(s.queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
        bodies
    }

    /// The oldest delivery is in hand while the four after it settle in one flush (joined
    /// before the flusher can run: current-thread runtime). The flush must not cover the held
    /// one: once the consuming channel closes, exactly that one comes back.
    #[tokio::test]
    async fn a_flush_of_later_acks_never_covers_the_oldest_delivery_in_hand() {
        let mut s = setup(5, "held").await;
        let acks = Acks::start(s.consume.clone());
        let tags: Vec<DeliveryTag> = receive(&mut s, &acks, 5).await.iter().map(|d| d.delivery_tag).collect();
        ack_together(&acks, &tags[1..]).await;
        let back = came_back(s, &acks, 1).await;
        assert_eq!(back, vec!["0".to_string()], "only the held delivery comes back");
    }

    /// A flush in order (nothing held) is one range; all acked, nothing comes back.
    #[tokio::test]
    async fn a_flush_in_delivery_order_acks_everything() {
        let mut s = setup(5, "order").await;
        let acks = Acks::start(s.consume.clone());
        let tags: Vec<DeliveryTag> = receive(&mut s, &acks, 5).await.iter().map(|d| d.delivery_tag).collect();
        ack_together(&acks, &tags).await;
        let back = came_back(s, &acks, 0).await;
        assert!(back.is_empty(), "nothing comes back: {back:?}");
    }

    /// An ack that arrives while the flusher is busy sending the previous flush must still go
    /// out (Notify permit), without any later ack or a close to push it. Tried many times so
    /// that the window (flusher inside `send`) is hit: in rounds of 30 pairs until it is, at
    /// most 10 (a loaded machine can let every send of a round finish before the check).
    #[tokio::test]
    async fn an_ack_made_while_a_flush_is_being_sent_is_not_left_waiting() {
        let mut hit = 0;
        for _round in 0..10 {
            hit += acks_made_during_a_flush_go_out(60).await;
            if hit > 0 {
                break;
            }
        }
        assert!(hit > 0, "the window was never hit");
    }

    /// One round of [`an_ack_made_while_a_flush_is_being_sent_is_not_left_waiting`] over `n`
    /// deliveries: how many times the window was hit.
    async fn acks_made_during_a_flush_go_out(n: usize) -> usize {
        let mut s = setup(n, "wake").await;
        let acks = Acks::start(s.consume.clone());
        let tags: Vec<DeliveryTag> = receive(&mut s, &acks, n).await.iter().map(|d| d.delivery_tag).collect();
        let mut hit = 0;
        for pair in tags.chunks(2) {
            let first = tokio::spawn({
                let (acks, tag) = (acks.clone(), pair[0]);
                async move { acks.ack(tag).await }
            });
            // Let the flusher take the first ack and start sending it.
            while acks.state().outstanding.contains(&pair[0]) {
                tokio::task::yield_now().await;
            }
            if !first.is_finished() {
                hit += 1;
            }
            let second = tokio::time::timeout(Duration::from_secs(3), acks.ack(pair[1])).await;
            assert!(matches!(second, Ok(Ok(()))), "the second ack was left waiting: {second:?}");
            tokio::time::timeout(PATIENCE, first).await.unwrap().unwrap().unwrap();
        }
        let back = came_back(s, &acks, 0).await;
        assert!(back.is_empty(), "nothing comes back: {back:?}");
        hit
    }

    /// The requeue path as `apply` runs it: the oldest delivery handed back with its own
    /// `Acker::nack`, then `forget`, while the later ones settle and go out as one range right
    /// after the forget. lapin resolves the nack only once its frame is written (io_loop.rs:483)
    /// and queues both in the same FIFO (frames.rs:317), so the broker sees the nack first: the
    /// held one comes back (not swallowed by the range), and the channel is not closed by an
    /// "unknown delivery tag".
    #[tokio::test]
    async fn a_range_right_after_a_nack_and_forget_does_not_swallow_the_handed_back_delivery() {
        use lapin::options::BasicNackOptions;
        let mut s = setup(4, "nack").await;
        let acks = Acks::start(s.consume.clone());
        let mut deliveries = receive(&mut s, &acks, 4).await;
        let tags: Vec<DeliveryTag> = deliveries.iter().map(|d| d.delivery_tag).collect();
        let held = deliveries.remove(0);
        let hand_back = async {
            let r = held.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            acks.forget(tags[0]);
            r
        };
        let settle_later = async {
            while acks.state().outstanding.contains(&tags[0]) {
                tokio::task::yield_now().await;
            }
            ack_together(&acks, &tags[1..]).await
        };
        let (nacked, ()) =
            tokio::time::timeout(PATIENCE, async { tokio::join!(hand_back, settle_later) }).await.unwrap();
        assert!(nacked.unwrap(), "the nack was sent");
        // A channel error (PRECONDITION_FAILED) would show on the next synchronous call.
        s.consume.basic_qos(100, BasicQosOptions::default()).await.expect("the channel is still open");
        let back = came_back(s, &acks, 1).await;
        assert_eq!(back, vec!["0".to_string()], "the handed-back delivery is in the queue again");
    }
}
