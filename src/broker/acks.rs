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
        tokio::spawn(flush_until_closed(shared.clone(), channel));
        Acks { shared }
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
        self.shared.state()
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn flush_until_closed(shared: Arc<Shared>, channel: Channel) {
    loop {
        shared.wake.notified().await;
        let (plan, replies, closed) = {
            let mut state = shared.state();
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
        if closed && shared.state().ready.is_empty() {
            return;
        }
    }
}

/// Sends the plan's frames, in order, on `channel`.
async fn send(channel: &Channel, plan: &AckPlan) -> Result<(), String> {
    let ranges = plan.multiple.map(|tag| (tag, true));
    let singles = plan.singles.iter().map(|tag| (*tag, false));
    for (tag, multiple) in ranges.into_iter().chain(singles) {
        channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| format!("settling a delivery failed: {e}"))?;
    }
    Ok(())
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
