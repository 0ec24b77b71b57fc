//! The round protocol on the wire: a [`RoundTask`] or a [`ClientReply`] as
//! a small JSON header plus named f32 arrays, the shape that a transport
//! which moves arrays natively (Flower's ArrayRecord, chunked) carries
//! best. Parameters never travel inside the JSON: every parameter set of a
//! message becomes arrays named `<group>/<parameter>` in its own order, so
//! values arrive bit for bit and an 84 MB projector is never text.
//!
//! Groups: a task has `global` and, for SCAFFOLD, `server_control`; a reply
//! has `params` and, for SCAFFOLD, `control_delta`. Decoding checks that
//! every group named by the header is there and that nothing else is.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::params::{ParamSet, ParamTensor};
use crate::schedule::WarmupCosine;
use crate::task::{ClientReply, ClientStatus, RoundTask};
use crate::update::{ClientId, ClientInstruction, ClientUpdate, LocalObjective};
use crate::{CoreError, Result};

/// One message: the header (JSON) and its arrays, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    pub header: String,
    pub arrays: Vec<(String, ParamTensor)>,
}

/// The objective without its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
enum ObjectiveHeader {
    Plain,
    Proximal {
        mu: f64,
    },
    /// Its control variate is the `server_control` group.
    Scaffold,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TaskHeader {
    round: u64,
    client: ClientId,
    objective: ObjectiveHeader,
    max_local_steps: Option<u32>,
    schedule: WarmupCosine,
    samples_before: u64,
    checkpointed_round: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UpdateHeader {
    client: ClientId,
    num_samples: u64,
    num_steps: u64,
    lr_sum: f64,
    mean_loss: f64,
    /// Whether the `control_delta` group is there.
    control_delta: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReplyHeader {
    /// The round of the task it answers (a late or replayed reply names
    /// another round and is refused).
    round: u64,
    status: ClientStatus,
    update: Option<UpdateHeader>,
}

const GLOBAL: &str = "global";
const SERVER_CONTROL: &str = "server_control";
const PARAMS: &str = "params";
const CONTROL_DELTA: &str = "control_delta";

fn push_group(arrays: &mut Vec<(String, ParamTensor)>, group: &str, set: &ParamSet) {
    for (name, tensor) in set.entries() {
        arrays.push((format!("{group}/{name}"), tensor.clone()));
    }
}

/// The arrays of `group`, in order, as a parameter set.
fn take_group(arrays: &[(String, ParamTensor)], group: &str) -> Result<ParamSet> {
    let prefix = format!("{group}/");
    let entries: Vec<(String, ParamTensor)> = arrays
        .iter()
        .filter_map(|(name, t)| {
            name.strip_prefix(&prefix).map(|n| {
                ParamTensor::new(n, t.shape.clone(), t.data.clone()).map(|t| (n.to_string(), t))
            })
        })
        .collect::<Result<_>>()?;
    if entries.is_empty() {
        return Err(CoreError::Invalid(format!(
            "the message has no `{group}/...` arrays"
        )));
    }
    ParamSet::new(entries)
}

/// Refuses arrays outside the expected groups.
fn check_groups(arrays: &[(String, ParamTensor)], groups: &[&str]) -> Result<()> {
    for (name, _) in arrays {
        let known = name
            .split_once('/')
            .is_some_and(|(g, rest)| groups.contains(&g) && !rest.is_empty());
        if !known {
            return Err(CoreError::Invalid(format!(
                "unexpected array `{name}` (expected groups: {})",
                groups.join(", ")
            )));
        }
    }
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Headers hold only numbers, ids and finite schedule settings.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"unencodable\": \"{e}\"}}"))
}

fn from_json<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| CoreError::Invalid(format!("bad {what} header: {e}")))
}

/// An array as a transport delivers it (a name, a shape, the raw
/// little-endian f32 bytes) as a tensor; a byte count that is not whole
/// f32 values or does not fill the shape is refused.
pub fn tensor_from_le_bytes(name: &str, shape: Vec<usize>, bytes: &[u8]) -> Result<ParamTensor> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CoreError::Invalid(format!(
            "array `{name}`: {} bytes is not a whole number of f32 values",
            bytes.len()
        )));
    }
    let data = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    ParamTensor::new(name, shape, data)
}

/// A task as a header and its arrays.
pub fn encode_task(task: &RoundTask) -> WireMessage {
    let mut arrays = Vec::new();
    push_group(&mut arrays, GLOBAL, &task.global);
    let objective = match &task.instruction.objective {
        LocalObjective::Plain => ObjectiveHeader::Plain,
        LocalObjective::Proximal { mu } => ObjectiveHeader::Proximal { mu: *mu },
        LocalObjective::Scaffold { server_control } => {
            push_group(&mut arrays, SERVER_CONTROL, server_control);
            ObjectiveHeader::Scaffold
        }
    };
    let header = TaskHeader {
        round: task.instruction.round,
        client: task.instruction.client,
        objective,
        max_local_steps: task.instruction.max_local_steps,
        schedule: task.schedule,
        samples_before: task.samples_before,
        checkpointed_round: task.checkpointed_round,
    };
    WireMessage {
        header: to_json(&header),
        arrays,
    }
}

/// The task a message carries.
pub fn decode_task(message: &WireMessage) -> Result<RoundTask> {
    let h: TaskHeader = from_json("task", &message.header)?;
    let objective = match h.objective {
        ObjectiveHeader::Plain => LocalObjective::Plain,
        ObjectiveHeader::Proximal { mu } => LocalObjective::Proximal { mu },
        ObjectiveHeader::Scaffold => LocalObjective::Scaffold {
            server_control: take_group(&message.arrays, SERVER_CONTROL)?,
        },
    };
    let groups: &[&str] = if matches!(objective, LocalObjective::Scaffold { .. }) {
        &[GLOBAL, SERVER_CONTROL]
    } else {
        &[GLOBAL]
    };
    check_groups(&message.arrays, groups)?;
    Ok(RoundTask {
        instruction: ClientInstruction {
            round: h.round,
            client: h.client,
            objective,
            max_local_steps: h.max_local_steps,
        },
        global: Arc::new(take_group(&message.arrays, GLOBAL)?),
        schedule: h.schedule,
        samples_before: h.samples_before,
        checkpointed_round: h.checkpointed_round,
    })
}

/// A reply to a task of `round` as a header and its arrays.
pub fn encode_reply(round: u64, reply: &ClientReply) -> WireMessage {
    let mut arrays = Vec::new();
    let update = reply.update.as_ref().map(|u| {
        push_group(&mut arrays, PARAMS, &u.params);
        if let Some(delta) = &u.control_delta {
            push_group(&mut arrays, CONTROL_DELTA, delta);
        }
        UpdateHeader {
            client: u.client,
            num_samples: u.num_samples,
            num_steps: u.num_steps,
            lr_sum: u.lr_sum,
            mean_loss: u.mean_loss,
            control_delta: u.control_delta.is_some(),
        }
    });
    WireMessage {
        header: to_json(&ReplyHeader {
            round,
            status: reply.status,
            update,
        }),
        arrays,
    }
}

/// The reply a message carries, and the round it answers.
pub fn decode_reply(message: &WireMessage) -> Result<(u64, ClientReply)> {
    let h: ReplyHeader = from_json("reply", &message.header)?;
    let update = match h.update {
        None => {
            check_groups(&message.arrays, &[])?;
            None
        }
        Some(u) => {
            let groups: &[&str] = if u.control_delta {
                &[PARAMS, CONTROL_DELTA]
            } else {
                &[PARAMS]
            };
            check_groups(&message.arrays, groups)?;
            if u.client != h.status.client {
                return Err(CoreError::Invalid(format!(
                    "a reply from client {} carries an update of client {}",
                    h.status.client.0, u.client.0
                )));
            }
            Some(ClientUpdate {
                client: u.client,
                params: take_group(&message.arrays, PARAMS)?,
                num_samples: u.num_samples,
                num_steps: u.num_steps,
                lr_sum: u.lr_sum,
                mean_loss: u.mean_loss,
                control_delta: u
                    .control_delta
                    .then(|| take_group(&message.arrays, CONTROL_DELTA))
                    .transpose()?,
            })
        }
    };
    Ok((
        h.round,
        ClientReply {
            status: h.status,
            update,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(scale: f32) -> Result<ParamSet> {
        ParamSet::new(vec![
            (
                "linear_1.weight".into(),
                ParamTensor::new("w", vec![2, 3], (0..6).map(|i| i as f32 * scale).collect())?,
            ),
            (
                "linear_1.bias".into(),
                ParamTensor::new("b", vec![2], vec![f32::MIN_POSITIVE, -0.0])?,
            ),
        ])
    }

    fn task(objective: LocalObjective) -> Result<RoundTask> {
        Ok(RoundTask {
            instruction: ClientInstruction {
                round: 3,
                client: ClientId(7),
                objective,
                max_local_steps: Some(2),
            },
            global: Arc::new(set(0.1)?),
            schedule: WarmupCosine {
                peak_lr: 1e-3,
                total_samples: 100,
                warmup_ratio: 0.03,
            },
            samples_before: 40,
            checkpointed_round: Some(2),
        })
    }

    #[test]
    fn tasks_round_trip_for_every_objective() -> Result<()> {
        for objective in [
            LocalObjective::Plain,
            LocalObjective::Proximal { mu: 0.25 },
            LocalObjective::Scaffold {
                server_control: set(-2.0)?,
            },
        ] {
            let t = task(objective)?;
            let wire = encode_task(&t);
            assert!(!wire.header.contains("linear_1"), "{}", wire.header);
            assert_eq!(decode_task(&wire)?, t);
        }
        Ok(())
    }

    #[test]
    fn replies_round_trip_with_and_without_update() -> Result<()> {
        let status = ClientStatus {
            client: ClientId(7),
            samples_left: 5,
            consumed: 11,
            skipped: 0,
        };
        let update = ClientUpdate {
            client: ClientId(7),
            params: set(0.5)?,
            num_samples: 4,
            num_steps: 2,
            lr_sum: 1.5e-3,
            mean_loss: 2.25,
            control_delta: Some(set(1e-30)?),
        };
        for reply in [
            ClientReply {
                status,
                update: None,
            },
            ClientReply {
                status,
                update: Some(ClientUpdate {
                    control_delta: None,
                    ..update.clone()
                }),
            },
            ClientReply {
                status,
                update: Some(update),
            },
        ] {
            let wire = encode_reply(9, &reply);
            let (round, back) = decode_reply(&wire)?;
            assert_eq!(round, 9);
            assert_eq!(back, reply);
            // Bit for bit, the sign of zero included.
            if let (Some(a), Some(b)) = (&back.update, &reply.update) {
                let bits = |s: &ParamSet| s.flat().map(f32::to_bits).collect::<Vec<_>>();
                assert_eq!(bits(&a.params), bits(&b.params));
            }
        }
        Ok(())
    }

    /// The error's message, or a marker that there was none.
    fn failure<T>(result: Result<T>) -> String {
        match result {
            Ok(_) => "decoded without error".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() -> Result<()> {
        let mut wire = encode_task(&task(LocalObjective::Plain)?);
        wire.arrays
            .push(("stray".into(), ParamTensor::new("s", vec![1], vec![0.0])?));
        let e = failure(decode_task(&wire));
        assert!(e.contains("unexpected array `stray`"), "{e}");

        let mut wire = encode_task(&task(LocalObjective::Plain)?);
        wire.arrays.clear();
        let e = failure(decode_task(&wire));
        assert!(e.contains("no `global/...` arrays"), "{e}");

        let wire = WireMessage {
            header: "{\"round\": -1}".into(),
            arrays: vec![],
        };
        let e = failure(decode_task(&wire));
        assert!(e.contains("bad task header"), "{e}");

        let status = ClientStatus {
            client: ClientId(1),
            samples_left: 0,
            consumed: 0,
            skipped: 0,
        };
        let mut update = ClientUpdate {
            client: ClientId(2),
            params: set(1.0)?,
            num_samples: 1,
            num_steps: 1,
            lr_sum: 0.1,
            mean_loss: 1.0,
            control_delta: None,
        };
        let wire = encode_reply(
            1,
            &ClientReply {
                status,
                update: Some(update.clone()),
            },
        );
        let e = failure(decode_reply(&wire));
        assert!(e.contains("carries an update of client 2"), "{e}");
        update.client = ClientId(1);
        let mut wire = encode_reply(
            1,
            &ClientReply {
                status,
                update: Some(update),
            },
        );
        wire.arrays[0].1.data.pop();
        assert!(decode_reply(&wire).is_err());
        Ok(())
    }
}
