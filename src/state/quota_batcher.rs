//! Admissions and finishes of calls to providers with limits, batched (issue #9).
//!
//! With limits declared, every call asks the database for a slot (`fallback_admit_batch`,
//! migration 0008) and hands it back when answered (`fallback_finish_batch`). One transaction per
//! call made a provider's calls queue behind each other's round trip and WAL flush: dozens wait
//! under load. Here the asks for one provider that arrive while that provider's batch runs go out
//! together in the next one (no added delay when idle, as in the ledger's batcher), decided in
//! order in one transaction that holds its locks exactly as a single admission did. A provider's
//! finishes go out in the same batches as its asks, before them (`fallback_finish_and_admit`,
//! migration 0009): one transaction where there were two, and an answer is never overtaken by an
//! ask that follows it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::StoreError;
use super::last_answer::LastAnswer;
use super::ledger_batcher::{BatchConnection, Failed, Leases, MAX_BATCH, batches_in_flight};
use super::postgres::{WindowSpec, epoch_ms, measure_name, saturating_i64};

/// A provider's windows as the batch statement takes them (its own limits' and its pools', in
/// the canonical lock order), prepared once per provider: every ask of a batch shares them.
#[derive(Debug)]
pub struct Windows {
    pub specs: Vec<WindowSpec>,
    kinds: Vec<&'static str>,
    scopes: Vec<String>,
    measures: Vec<&'static str>,
    windows_ms: Vec<i64>,
    calendars: Vec<String>,
    limits: Vec<i64>,
}

impl Windows {
    pub fn new(specs: Vec<WindowSpec>) -> Windows {
        Windows {
            kinds: specs.iter().map(|s| s.key.kind.as_str()).collect(),
            scopes: specs.iter().map(|s| s.key.scope.clone()).collect(),
            measures: specs.iter().map(|s| measure_name(s.key.measure)).collect(),
            windows_ms: specs.iter().map(|s| saturating_i64(s.key.window.as_millis())).collect(),
            calendars: specs.iter().map(|s| s.key.calendar.clone()).collect(),
            limits: specs.iter().map(|s| saturating_i64(s.limit)).collect(),
            specs,
        }
    }
}

/// One ask for a slot.
pub struct AdmitAsk {
    pub provider: Arc<str>,
    pub windows: Arc<Windows>,
    pub tokens: i64,
    pub flight_ms: i64,
    /// Per window: for a calendar window, the first reset after the call's deadline (epoch ms);
    /// `None` for a sliding one.
    pub leaves: Vec<Option<f64>>,
    /// The calls a credit holds (migration 0012); `None` for one call.
    pub requests: Option<i64>,
    /// How long a credit admits calls (ms).
    pub open_ms: Option<i64>,
    pub reply: oneshot::Sender<Result<Decision, StoreError>>,
}

/// The database's answer to one ask, as `fallback_admit` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub usage_id: Option<i64>,
    pub blocked_until_ms: Option<i64>,
    pub blocked_by: Option<String>,
}

pub enum Request {
    Admit(AdmitAsk),
    Finish(Answer),
}

/// What an answer writes of call `call` (the database's id) in its windows, as
/// `fallback_apply_finishes` (migration 0012) takes it. Writing it twice changes nothing: it
/// sets the counts, moves the call's end only earlier, and a credit's numbered write applies
/// only over an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerWrite {
    pub call: i64,
    /// The provider's token count (`None`: unknown, the estimate stands).
    pub tokens: Option<i64>,
    /// A closed credit's calls: its request count from then on.
    pub requests: Option<i64>,
    /// Whether the call's flight ends: a closed credit with calls still out keeps them in flight.
    pub ended: bool,
    /// A credit's write number.
    pub seq: Option<i64>,
}

impl AnswerWrite {
    /// The answer to one call: its count, and the end of its flight.
    pub fn of_call(call: i64, tokens: Option<i64>) -> AnswerWrite {
        AnswerWrite { call, tokens, requests: None, ended: true, seq: None }
    }
}

/// The answer to a call of `provider` arrived: what it writes.
pub struct Answer {
    pub provider: Arc<str>,
    pub write: AnswerWrite,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The answers' columns: calls, tokens, requests, ended, seqs.
pub(super) type AnswerColumns = (Vec<i64>, Vec<Option<i64>>, Vec<Option<i64>>, Vec<bool>, Vec<Option<i64>>);

/// The writes' columns as the statements take them, one entry per call (the statement counts
/// only the first of a call). A credit can have two writes in one batch, in either order: the
/// one with the higher number is its latest word (the statement too applies a credit's write
/// only over an older one).
pub(super) fn answer_columns<'a>(writes: impl IntoIterator<Item = &'a AnswerWrite>) -> AnswerColumns {
    let mut merged: Vec<AnswerWrite> = Vec::new();
    let mut at: HashMap<i64, usize> = HashMap::new();
    for write in writes {
        match at.get(&write.call).and_then(|&i| merged.get_mut(i)) {
            Some(kept) if write.seq >= kept.seq => *kept = *write,
            Some(_) => {}
            None => {
                at.insert(write.call, merged.len());
                merged.push(*write);
            }
        }
    }
    let mut columns = AnswerColumns::default();
    for write in merged {
        columns.0.push(write.call);
        columns.1.push(write.tokens);
        columns.2.push(write.requests);
        columns.3.push(write.ended);
        columns.4.push(write.seq);
    }
    columns
}

/// What a batch is made of: one provider's finishes and asks (the provider's name).
type Key = Arc<str>;

impl Request {
    fn is_answer(&self) -> bool {
        matches!(self, Request::Finish(_))
    }

    fn key(&self) -> Key {
        match self {
            Request::Admit(ask) => ask.provider.clone(),
            Request::Finish(answer) => answer.provider.clone(),
        }
    }
}

/// Starts the batching task; it ends when every sender is gone.
pub fn spawn(pool: PgPool, heard: Arc<LastAnswer>) -> mpsc::Sender<Request> {
    let (sender, receiver) = mpsc::channel(1024);
    tokio::spawn(run(pool, heard, receiver));
    sender
}

/// The requests waiting, by batch key, and which keys may go out next (in the order they became
/// ready, so no provider starves another).
#[derive(Default)]
struct Queues {
    waiting: HashMap<Key, VecDeque<Request>>,
    ready: VecDeque<Key>,
    in_flight: HashSet<Key>,
    by_task: HashMap<tokio::task::Id, Vec<Key>>,
    /// Answers alone of several providers go out together (only with one batch in flight: with
    /// two, a merged batch stuck on one provider's lock would hold the others' asks back).
    merge_answers: bool,
}

impl Queues {
    fn push(&mut self, request: Request) {
        let key = request.key();
        let queue = self.waiting.entry(key.clone()).or_default();
        if queue.is_empty() && !self.in_flight.contains(&key) {
            self.ready.push_back(key);
        }
        queue.push_back(request);
    }

    /// The next batch that may go out, and the providers it holds: at most one batch per
    /// provider in flight.
    fn next_batch(&mut self) -> Option<(Vec<Key>, Vec<Request>)> {
        while let Some(key) = self.ready.pop_front() {
            let Some(queue) = self.waiting.get_mut(&key) else { continue };
            let mut batch = take_batch(queue);
            if queue.is_empty() {
                self.waiting.remove(&key);
            }
            if batch.is_empty() {
                continue;
            }
            let mut keys = vec![key];
            if self.merge_answers && batch.iter().all(Request::is_answer) {
                self.add_other_answers(&mut keys, &mut batch);
            }
            return Some((keys, batch));
        }
        None
    }

    /// Answers alone, with no ask to ride with: the answers of every other provider that has
    /// nothing but answers waiting join them, all recorded in one transaction.
    fn add_other_answers(&mut self, keys: &mut Vec<Key>, batch: &mut Vec<Request>) {
        let mut i = 0;
        while let Some(key) = self.ready.get(i) {
            let fits = |q: &VecDeque<Request>| batch.len().saturating_add(q.len()) <= MAX_BATCH;
            let only_answers = self.waiting.get(key).is_some_and(|q| q.iter().all(Request::is_answer) && fits(q));
            if !only_answers {
                i += 1;
                continue;
            }
            let Some(key) = self.ready.remove(i) else { break };
            batch.extend(self.waiting.remove(&key).unwrap_or_default());
            keys.push(key);
        }
    }

    fn hold(&mut self, task: tokio::task::Id, keys: Vec<Key>) {
        self.in_flight.extend(keys.iter().cloned());
        self.by_task.insert(task, keys);
    }

    /// A batch ended (finished, failed or timed out): its providers may go out again.
    fn release(&mut self, task: tokio::task::Id) {
        for key in self.by_task.remove(&task).unwrap_or_default() {
            self.in_flight.remove(&key);
            if self.waiting.get(&key).is_some_and(|q| !q.is_empty()) {
                self.ready.push_back(key);
            }
        }
    }
}

/// Up to [`MAX_BATCH`] requests from the front of `queue`; asks only with the same windows as
/// the first (a provider's limits do not change within a process, but a batch must never mix
/// two sets of windows: the statement takes one).
fn take_batch(queue: &mut VecDeque<Request>) -> Vec<Request> {
    let mut batch = Vec::new();
    let mut shape: Option<Arc<Windows>> = None;
    let mut rest = VecDeque::new();
    while let Some(request) = queue.pop_front() {
        if batch.len() >= MAX_BATCH {
            rest.push_back(request);
            continue;
        }
        if let Request::Admit(ask) = &request {
            match &shape {
                None => shape = Some(ask.windows.clone()),
                Some(windows) if !Arc::ptr_eq(windows, &ask.windows) => {
                    rest.push_back(request);
                    continue;
                }
                Some(_) => {}
            }
        }
        batch.push(request);
    }
    *queue = rest;
    batch
}

async fn run(pool: PgPool, heard: Arc<LastAnswer>, mut receiver: mpsc::Receiver<Request>) {
    // Across providers and finishes together, as for the ledger (one at a time on the default
    // pool, so that the ledger's batch and a cooldown or a circuit's probe find a connection; a
    // second batch goes out only while a connection is idle). The size of a batch and its time
    // limit are the ledger's too.
    let max_in_flight = batches_in_flight(&pool);
    let mut queues = Queues { merge_answers: max_in_flight == 1, ..Queues::default() };
    let mut in_flight: JoinSet<Option<PoolConnection<Postgres>>> = JoinSet::new();
    let mut leases = Leases::new(pool.clone());
    let mut closed = false;
    loop {
        while in_flight.len() < max_in_flight && (in_flight.is_empty() || leases.available() > 0) {
            let Some((keys, batch)) = queues.next_batch() else { break };
            // Bounded inside (`BATCH_TIMEOUT`): a batch is never dropped while its query runs.
            // Boxed, as the ledger's batches (see there).
            let task = in_flight.spawn(Box::pin(execute(pool.clone(), heard.clone(), leases.take(), batch)));
            queues.hold(task.id(), keys);
        }
        if closed && in_flight.is_empty() && queues.ready.is_empty() {
            break;
        }
        // No batch may go out now (nothing waits, or only for a batch in flight): a kept
        // connection goes back to the pool rather than idle beside it.
        if queues.ready.is_empty() && receiver.is_empty() {
            leases.release();
        }
        tokio::select! {
            request = receiver.recv(), if !closed => match request {
                Some(request) => {
                    queues.push(request);
                    // Whatever else has arrived goes into the same batches.
                    for _ in 0..MAX_BATCH * 4 {
                        match receiver.try_recv() {
                            Ok(request) => queues.push(request),
                            Err(_) => break,
                        }
                    }
                }
                None => closed = true,
            },
            ended = in_flight.join_next_with_id(), if !in_flight.is_empty() => match ended {
                Some(Ok((task, handed_back))) => {
                    queues.release(task);
                    leases.keep(handed_back);
                }
                Some(Err(error)) => queues.release(error.id()),
                None => {}
            },
        }
    }
    leases.release();
}

/// Sends one batch (on `leased`, the previous batch's connection, when there is one); hands
/// back its connection when it is still usable.
async fn execute(
    pool: PgPool,
    heard: Arc<LastAnswer>,
    leased: Option<PoolConnection<Postgres>>,
    batch: Vec<Request>,
) -> Option<PoolConnection<Postgres>> {
    let (mut asks, mut answers) = (Vec::new(), Vec::new());
    for request in batch {
        match request {
            Request::Admit(ask) => asks.push(ask),
            Request::Finish(answer) => answers.push(answer),
        }
    }
    let mut conn = match BatchConnection::acquire(&pool, leased, heard).await {
        Ok(conn) => conn,
        Err(failed) => {
            fail_all(asks, answers, &failed);
            return None;
        }
    };
    if asks.is_empty() {
        finish_all(&mut conn, answers).await;
    } else {
        admit_all(&mut conn, asks, answers).await;
    }
    conn.into_reusable()
}

fn fail_all(asks: Vec<AdmitAsk>, answers: Vec<Answer>, failed: &Failed) {
    for ask in asks {
        let _ = ask.reply.send(Err(failed.to_store_error()));
    }
    for answer in answers {
        let _ = answer.reply.send(Err(failed.to_store_error()));
    }
}

/// Tells each answer's caller how its batch ended.
fn reply_to_answers(answers: Vec<Answer>, outcome: Result<(), &Failed>) {
    for answer in answers {
        let _ = answer.reply.send(outcome.map_err(Failed::to_store_error));
    }
}

/// The admission statement: `$1`..`$14` the provider, its windows and the asks (as
/// `fallback_admit_batch` takes them), the function's name and what follows `$14`.
macro_rules! admit_sql {
    ($function:literal, $rest:literal) => {
        concat!(
            "SELECT ask, usage_id, blocked_until_ms, blocked_by FROM ",
            $function,
            "$1, $2, $3, $4, $5, $6, $7, \
               (SELECT array_agg(to_timestamp(f / 1000) ORDER BY o) FROM unnest($8::float8[]) WITH ORDINALITY AS t(f, o)), \
               (SELECT array_agg(to_timestamp(f / 1000) ORDER BY o) FROM unnest($9::float8[]) WITH ORDINALITY AS t(f, o)), \
               $10, $11, \
               (SELECT array_agg(to_timestamp(l / 1000) ORDER BY o) FROM unnest($12::float8[]) WITH ORDINALITY AS t(l, o)), \
               $13, $14",
            $rest
        )
    };
}

/// Records the provider's `answers`, then admits its asks, in order, in one statement, and
/// replies to each.
async fn admit_all(conn: &mut BatchConnection, asks: Vec<AdmitAsk>, answers: Vec<Answer>) {
    let Some((windows, provider)) = asks.first().map(|a| (a.windows.clone(), a.provider.clone())) else {
        return finish_all(conn, answers).await;
    };
    let n = windows.specs.len();
    // The resets as of now (the asks waited a moment): the statement takes the reset after the
    // first when, by its clock, the first has passed.
    let now = SystemTime::now();
    let first_resets: Vec<Option<f64>> =
        windows.specs.iter().map(|s| s.reset.as_ref().map(|r| epoch_ms(r.next_after(now)) as f64)).collect();
    let next_resets: Vec<Option<f64>> = windows
        .specs
        .iter()
        .map(|s| s.reset.as_ref().map(|r| epoch_ms(r.next_after(r.next_after(now))) as f64))
        .collect();
    let tokens: Vec<i64> = asks.iter().map(|a| a.tokens).collect();
    let flights: Vec<i64> = asks.iter().map(|a| a.flight_ms).collect();
    // asks × windows, row-major; exactly `n` per ask whatever an ask carries.
    let leaves: Vec<Option<f64>> =
        asks.iter().flat_map(|a| a.leaves.iter().copied().chain(std::iter::repeat(None)).take(n)).collect();
    let requests: Vec<Option<i64>> = asks.iter().map(|a| a.requests).collect();
    let opens: Vec<Option<i64>> = asks.iter().map(|a| a.open_ms).collect();
    let (calls, call_tokens, call_requests, call_ended, call_seqs) = answer_columns(answers.iter().map(|a| &a.write));
    let statement = if answers.is_empty() {
        admit_sql!("fallback_admit_batch(", ")")
    } else {
        admit_sql!("fallback_finish_and_admit(", ", $15, $16, $17, $18, $19)")
    };
    let query = sqlx::query(statement)
        .bind(&*provider)
        .bind(&windows.kinds)
        .bind(&windows.scopes)
        .bind(&windows.measures)
        .bind(&windows.windows_ms)
        .bind(&windows.calendars)
        .bind(&windows.limits)
        .bind(&first_resets)
        .bind(&next_resets)
        .bind(&tokens)
        .bind(&flights)
        .bind(&leaves)
        .bind(&requests)
        .bind(&opens);
    let query = if answers.is_empty() {
        query
    } else {
        query.bind(&calls).bind(&call_tokens).bind(&call_requests).bind(&call_ended).bind(&call_seqs)
    };
    let rows = conn.run(async |c| query.fetch_all(c).await).await;
    // Recorded, or failed where answers alone fail too (a window held past 1 s): when the asks'
    // locks are held elsewhere the statement records the answers alone (migration 0009).
    reply_to_answers(answers, rows.as_ref().map(|_| ()));
    let mut answers: Vec<Option<Result<Decision, Failed>>> = (0..asks.len()).map(|_| None).collect();
    match rows {
        Ok(rows) => {
            for row in rows {
                let (Ok(ask), Ok(usage_id), Ok(blocked_until_ms), Ok(blocked_by)) = (
                    row.try_get::<i32, _>("ask"),
                    row.try_get::<Option<i64>, _>("usage_id"),
                    row.try_get::<Option<i64>, _>("blocked_until_ms"),
                    row.try_get::<Option<String>, _>("blocked_by"),
                ) else {
                    continue;
                };
                let slot = usize::try_from(ask).ok().and_then(|a| a.checked_sub(1)).and_then(|i| answers.get_mut(i));
                if let Some(slot) = slot {
                    *slot = Some(Ok(Decision { usage_id, blocked_until_ms, blocked_by }));
                }
            }
        }
        Err(failed) => {
            answers.iter_mut().for_each(|a| *a = Some(Err(failed.clone())));
        }
    }
    for (ask, answer) in asks.into_iter().zip(answers) {
        let answer = match answer {
            Some(Ok(decision)) => Ok(decision),
            Some(Err(failed)) => Err(failed.to_store_error()),
            None => Err(StoreError::Unavailable("the admission returned no row for an ask".into())),
        };
        let _ = ask.reply.send(answer);
    }
}

/// Records the answers of many calls in one statement.
async fn finish_all(conn: &mut BatchConnection, answers: Vec<Answer>) {
    let (calls, tokens, requests, ended, seqs) = answer_columns(answers.iter().map(|a| &a.write));
    let query = sqlx::query("SELECT fallback_finish_batch($1, $2, $3, $4, $5)")
        .bind(&calls)
        .bind(&tokens)
        .bind(&requests)
        .bind(&ended)
        .bind(&seqs);
    let outcome = conn.run(async |c| query.execute(c).await.map(|_| ())).await;
    reply_to_answers(answers, outcome.as_ref().copied());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(provider: &str, windows: &Arc<Windows>) -> Request {
        let (reply, _) = oneshot::channel();
        Request::Admit(AdmitAsk {
            provider: provider.into(),
            windows: windows.clone(),
            tokens: 1,
            flight_ms: 1000,
            leaves: Vec::new(),
            requests: None,
            open_ms: None,
            reply,
        })
    }

    fn finish(provider: &str, call: i64) -> Request {
        let (reply, _) = oneshot::channel();
        Request::Finish(Answer { provider: provider.into(), write: AnswerWrite::of_call(call, None), reply })
    }

    fn merging() -> Queues {
        Queues { merge_answers: true, ..Queues::default() }
    }

    fn names(keys: &[Key]) -> Vec<&str> {
        keys.iter().map(|k| &**k).collect()
    }

    #[test]
    fn answers_alone_of_several_providers_go_out_together_but_never_with_a_providers_asks() {
        let w = Arc::new(Windows::new(Vec::new()));
        let mut queues = merging();
        for request in [finish("a", 1), finish("b", 2), ask("c", &w), finish("c", 3), finish("d", 4), finish("a", 5)] {
            queues.push(request);
        }
        let (keys, batch) = queues.next_batch().unwrap();
        let calls: Vec<i64> =
            batch.iter().filter_map(|r| if let Request::Finish(a) = r { Some(a.write.call) } else { None }).collect();
        assert_eq!((names(&keys), calls), (vec!["a", "b", "d"], vec![1, 5, 2, 4]));
        let (keys, batch) = queues.next_batch().unwrap();
        assert_eq!((names(&keys), batch.iter().map(Request::is_answer).collect()), (vec!["c"], vec![false, true]));
        assert!(queues.next_batch().is_none());
    }

    #[test]
    fn a_providers_finishes_go_with_its_asks_one_batch_per_provider_in_flight_in_arrival_order() {
        let w = Arc::new(Windows::new(Vec::new()));
        let mut queues = Queues::default();
        for request in [ask("a", &w), finish("a", 1), ask("b", &w), ask("a", &w), finish("b", 2)] {
            queues.push(request);
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut set = JoinSet::new();
            let (key, batch) = queues.next_batch().unwrap();
            let kinds: Vec<bool> = batch.iter().map(Request::is_answer).collect();
            assert_eq!((names(&key), kinds), (vec!["a"], vec![false, true, false]), "a's asks and finishes, in order");
            let a_task = set.spawn(async {}).id();
            queues.hold(a_task, key);
            queues.push(ask("a", &w));
            let (key, batch) = queues.next_batch().unwrap();
            let kinds: Vec<bool> = batch.iter().map(Request::is_answer).collect();
            assert_eq!((names(&key), kinds), (vec!["b"], vec![false, true]));
            let b_task = set.spawn(async {}).id();
            queues.hold(b_task, key);
            assert!(queues.next_batch().is_none(), "a's next ask waits for a's batch in flight");
            queues.release(a_task);
            let (key, batch) = queues.next_batch().unwrap();
            assert_eq!((names(&key), batch.len()), (vec!["a"], 1));
        });
    }

    #[test]
    fn answers_are_not_merged_across_providers_when_two_batches_may_be_in_flight() {
        let mut queues = Queues::default();
        queues.push(finish("a", 1));
        queues.push(finish("b", 2));
        let (keys, _) = queues.next_batch().unwrap();
        assert_eq!(names(&keys), vec!["a"]);
    }

    #[test]
    fn a_batch_never_mixes_two_sets_of_windows_nor_exceeds_its_size() {
        let (w1, w2) = (Arc::new(Windows::new(Vec::new())), Arc::new(Windows::new(Vec::new())));
        let mut queue: VecDeque<Request> = [ask("a", &w1), ask("a", &w2), ask("a", &w1)].into();
        let batch = take_batch(&mut queue);
        assert_eq!((batch.len(), queue.len()), (2, 1));
        let mut queue: VecDeque<Request> = (0..MAX_BATCH + 3).map(|_| ask("a", &w1)).collect();
        assert_eq!(take_batch(&mut queue).len(), MAX_BATCH);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn a_credits_latest_write_is_its_word_in_a_batch_whichever_came_first() {
        let closed = AnswerWrite { call: 7, tokens: Some(130), requests: Some(2), ended: false, seq: Some(1) };
        let ended = AnswerWrite { call: 7, tokens: Some(95), requests: Some(2), ended: true, seq: Some(2) };
        let plain = AnswerWrite::of_call(8, Some(10));
        let expected =
            (vec![7, 8], vec![Some(95), Some(10)], vec![Some(2), None], vec![true, true], vec![Some(2), None]);
        assert_eq!(answer_columns([&closed, &plain, &ended]), expected);
        assert_eq!(answer_columns([&ended, &plain, &closed]), expected);
        // A plain call given twice: its last entry (the same answer, written again).
        let again = AnswerWrite::of_call(8, Some(12));
        assert_eq!(answer_columns([&plain, &again]), (vec![8], vec![Some(12)], vec![None], vec![true], vec![None]));
    }
}
