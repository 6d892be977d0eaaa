//! Job specifications: what a user submits, and its validation.
//!
//! A spec is immutable once submitted: it is written once, by the accepting node, into the
//! job's document. Validation happens before that, so a bad spec never enters the table.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Upper bounds on a spec. Each keeps one submission from costing the cluster unbounded state.
pub mod limits {
    /// A job name is a label for humans and logs, not a document.
    pub const MAX_NAME_LEN: usize = 128;
    /// Instances per job: every instance is a handful of keys in the job document on every node.
    pub const MAX_COUNT: u32 = 1_000;
    /// Arguments per command, and bytes per argument or environment value.
    pub const MAX_ARGS: usize = 256;
    /// Bytes per argument, environment value or command.
    pub const MAX_STRING_LEN: usize = 4096;
    /// Environment variables per job.
    pub const MAX_ENV: usize = 256;
    /// Constraints per job.
    pub const MAX_CONSTRAINTS: usize = 32;
    /// Restart attempts: past this a crash loop is a bug in the job, not bad luck.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// A CPU request larger than any plausible machine (1,024 cores) is a typo.
    pub const MAX_CPU_MILLIS: u64 = 1_024_000;
    /// A memory request larger than any plausible machine (64 TiB) is a typo.
    pub const MAX_MEMORY_MB: u64 = 64 * 1024 * 1024;
}

/// How a job's instances live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Runs to completion; a failed run is retried per the restart policy.
    #[default]
    Batch,
    /// Runs until stopped; any exit is restarted after the policy's delay.
    Service,
}

/// What one instance needs from a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in MiB.
    #[serde(default)]
    pub memory_mb: u64,
}

impl Resources {
    /// `self + other`, saturating.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
        }
    }
    /// `self - other`, saturating at zero.
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
        }
    }
    /// Whether `request` fits in `self`.
    pub fn fits(self, request: Resources) -> bool {
        request.cpu_millis <= self.cpu_millis && request.memory_mb <= self.memory_mb
    }
}

/// A placement constraint on node labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// The label key.
    pub label: String,
    /// How to compare.
    #[serde(default)]
    pub op: ConstraintOp,
    /// The value compared against (ignored by `exists`).
    #[serde(default)]
    pub value: String,
}

/// Comparison of a [`Constraint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConstraintOp {
    /// The label equals the value.
    #[default]
    Eq,
    /// The label is absent or differs from the value.
    Ne,
    /// The label is present.
    Exists,
}

impl Constraint {
    /// Whether a node with `labels` satisfies this constraint.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self.op {
            ConstraintOp::Eq => labels.get(&self.label) == Some(&self.value),
            ConstraintOp::Ne => labels.get(&self.label) != Some(&self.value),
            ConstraintOp::Exists => labels.contains_key(&self.label),
        }
    }
}

/// Where a retried attempt may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestartPlacement {
    /// Any eligible node, the previous one included (ranking decides).
    #[default]
    Any,
    /// Prefer a node that has not failed this instance before, when one is eligible.
    Other,
}

/// What happens when an attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Total attempts for a batch instance, the first included. A service restarts forever.
    #[serde(default = "RestartPolicy::default_attempts")]
    pub attempts: u32,
    /// Delay before the second attempt.
    #[serde(default = "RestartPolicy::default_delay_ms")]
    pub delay_ms: u64,
    /// Each further attempt waits this factor longer (1.0 = constant delay).
    #[serde(default = "RestartPolicy::default_backoff")]
    pub backoff: f64,
    /// The longest delay, whatever the backoff.
    #[serde(default = "RestartPolicy::default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Where the next attempt runs.
    #[serde(default)]
    pub placement: RestartPlacement,
}

impl RestartPolicy {
    fn default_attempts() -> u32 {
        3
    }
    fn default_delay_ms() -> u64 {
        1_000
    }
    fn default_backoff() -> f64 {
        2.0
    }
    fn default_max_delay_ms() -> u64 {
        60_000
    }
    /// The delay before attempt `attempt` (0-based) after `failures` failures.
    pub fn delay_after_failures_ms(&self, failures: u32) -> u64 {
        if failures == 0 {
            return 0;
        }
        let factor = self.backoff.max(1.0).powi(failures.saturating_sub(1).min(64) as i32);
        let delay = (self.delay_ms as f64 * factor).min(self.max_delay_ms as f64);
        delay as u64
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            attempts: Self::default_attempts(),
            delay_ms: Self::default_delay_ms(),
            backoff: Self::default_backoff(),
            max_delay_ms: Self::default_max_delay_ms(),
            placement: RestartPlacement::Any,
        }
    }
}

/// A job as submitted. Serializes to the HTTP API's and the TOML file's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A human name; need not be unique.
    #[serde(default)]
    pub name: String,
    /// Batch or service.
    #[serde(default)]
    pub kind: JobKind,
    /// Which driver runs it: `exec` (a child process) or the name of an in-process handler.
    #[serde(default = "JobSpec::default_driver")]
    pub driver: String,
    /// The program to run.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment (nothing else is inherited but PATH and HOME).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Its working directory; the agent's data dir when absent.
    #[serde(default)]
    pub workdir: Option<String>,
    /// What each instance needs.
    #[serde(default)]
    pub resources: Resources,
    /// How many instances.
    #[serde(default = "JobSpec::default_count")]
    pub count: u32,
    /// Higher runs first when capacity is short (0..=100).
    #[serde(default)]
    pub priority: i32,
    /// Where it may run.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// What happens on failure.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// A spec that cannot be accepted: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid job spec: field `{field}`: {problem}")]
pub struct SpecError {
    /// The offending field, as a path (`resources.memory_mb`, `constraints[2].label`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl SpecError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
        SpecError { field: field.into(), problem: problem.into() }
    }
}

impl JobSpec {
    fn default_driver() -> String {
        "exec".to_string()
    }
    fn default_count() -> u32 {
        1
    }

    /// A batch job running `command` with `args`, one instance, no resource request.
    pub fn command<I, S>(command: impl Into<String>, args: I) -> JobSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let command = command.into();
        JobSpec {
            name: command.clone(),
            kind: JobKind::Batch,
            driver: Self::default_driver(),
            command,
            args: args.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            workdir: None,
            resources: Resources::default(),
            count: 1,
            priority: 0,
            constraints: Vec::new(),
            restart: RestartPolicy::default(),
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_string("name", &self.name, limits::MAX_NAME_LEN, true)?;
        if self.name.chars().any(|c| c.is_control()) {
            return Err(SpecError::new("name", "must not contain control characters"));
        }
        check_string("driver", &self.driver, limits::MAX_NAME_LEN, false)?;
        check_string("command", &self.command, limits::MAX_STRING_LEN, false)?;
        if self.args.len() > limits::MAX_ARGS {
            return Err(SpecError::new("args", format!("at most {} arguments", limits::MAX_ARGS)));
        }
        for (i, arg) in self.args.iter().enumerate() {
            check_string(&format!("args[{i}]"), arg, limits::MAX_STRING_LEN, true)?;
        }
        if self.env.len() > limits::MAX_ENV {
            return Err(SpecError::new("env", format!("at most {} variables", limits::MAX_ENV)));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "a variable name must be non-empty without '=' or NUL",
                ));
            }
            check_string(&format!("env.{key}"), value, limits::MAX_STRING_LEN, true)?;
        }
        if let Some(dir) = &self.workdir {
            check_string("workdir", dir, limits::MAX_STRING_LEN, false)?;
        }
        if self.count == 0 || self.count > limits::MAX_COUNT {
            return Err(SpecError::new("count", format!("must be between 1 and {}", limits::MAX_COUNT)));
        }
        if !(0..=100).contains(&self.priority) {
            return Err(SpecError::new("priority", "must be between 0 and 100"));
        }
        if self.resources.cpu_millis > limits::MAX_CPU_MILLIS {
            return Err(SpecError::new(
                "resources.cpu_millis",
                format!("at most {} (1,024 cores)", limits::MAX_CPU_MILLIS),
            ));
        }
        if self.resources.memory_mb > limits::MAX_MEMORY_MB {
            return Err(SpecError::new("resources.memory_mb", format!("at most {} (64 TiB)", limits::MAX_MEMORY_MB)));
        }
        if self.constraints.len() > limits::MAX_CONSTRAINTS {
            return Err(SpecError::new("constraints", format!("at most {} constraints", limits::MAX_CONSTRAINTS)));
        }
        for (i, c) in self.constraints.iter().enumerate() {
            check_string(&format!("constraints[{i}].label"), &c.label, limits::MAX_NAME_LEN, false)?;
            check_string(&format!("constraints[{i}].value"), &c.value, limits::MAX_STRING_LEN, true)?;
        }
        if self.restart.attempts == 0 || self.restart.attempts > limits::MAX_ATTEMPTS {
            return Err(SpecError::new("restart.attempts", format!("must be between 1 and {}", limits::MAX_ATTEMPTS)));
        }
        if !self.restart.backoff.is_finite() || self.restart.backoff < 1.0 || self.restart.backoff > 10.0 {
            return Err(SpecError::new("restart.backoff", "must be a number between 1.0 and 10.0"));
        }
        if self.restart.max_delay_ms < self.restart.delay_ms {
            return Err(SpecError::new("restart.max_delay_ms", "must not be less than restart.delay_ms"));
        }
        Ok(())
    }
}

fn check_string(field: &str, value: &str, max: usize, empty_ok: bool) -> Result<(), SpecError> {
    if !empty_ok && value.trim().is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(SpecError::new(field, format!("at most {max} bytes")));
    }
    if value.contains('\0') {
        return Err(SpecError::new(field, "must not contain NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_command_is_valid() {
        JobSpec::command("echo", ["hi"]).validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut spec = JobSpec::command("echo", ["hi"]);
        spec.count = 0;
        assert_eq!(spec.validate().unwrap_err().field, "count");
        let mut spec = JobSpec::command("", Vec::<String>::new());
        spec.name = "x".into();
        assert_eq!(spec.validate().unwrap_err().field, "command");
        let mut spec = JobSpec::command("echo", ["hi"]);
        spec.resources.memory_mb = u64::MAX;
        assert_eq!(spec.validate().unwrap_err().field, "resources.memory_mb");
        let mut spec = JobSpec::command("echo", ["hi"]);
        spec.constraints.push(Constraint { label: "".into(), op: ConstraintOp::Eq, value: "x".into() });
        assert_eq!(spec.validate().unwrap_err().field, "constraints[0].label");
        let mut spec = JobSpec::command("echo", ["hi"]);
        spec.restart.backoff = f64::NAN;
        assert_eq!(spec.validate().unwrap_err().field, "restart.backoff");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<JobSpec>(r#"{"command":"x","comand":"y"}"#).unwrap_err();
        assert!(err.to_string().contains("comand"), "{err}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RestartPolicy {
            attempts: 5,
            delay_ms: 100,
            backoff: 2.0,
            max_delay_ms: 350,
            placement: RestartPlacement::Any,
        };
        assert_eq!(p.delay_after_failures_ms(0), 0);
        assert_eq!(p.delay_after_failures_ms(1), 100);
        assert_eq!(p.delay_after_failures_ms(2), 200);
        assert_eq!(p.delay_after_failures_ms(3), 350);
    }
}
