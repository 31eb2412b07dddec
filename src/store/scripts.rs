//! The Lua scripts of `lua/`, embedded at build time and loaded into Redis.
//!
//! Owns script source and SHA bookkeeping; building the calls is the job of the
//! operation modules in `store/`. Scripts are invoked with EVALSHA; a NOSCRIPT
//! reply (Redis restarted, SCRIPT FLUSH, failover to a fresh node) makes the
//! store reload every script and retry the affected calls.

/// One script of `lua/`.
pub struct LuaScript {
    pub name: &'static str,
    source: &'static str,
    sha: String,
}

impl LuaScript {
    fn new(name: &'static str, source: &'static str) -> Self {
        let sha = redis::Script::new(source).get_hash().to_string();
        Self { name, source, sha }
    }

    /// SHA1 of the source, the EVALSHA handle.
    pub fn sha(&self) -> &str {
        &self.sha
    }

    pub fn source(&self) -> &'static str {
        self.source
    }

    /// `EVALSHA sha <n> <keys…>`; the caller appends the ARGV. `keys` are
    /// the script's `KEYS` in its header's order, all in one slot: Redis
    /// Cluster routes the call by them and, while that slot migrates,
    /// refuses it unless every one of them is on the node (docs/design.md §4).
    pub fn call(&self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len()).arg(keys);
        cmd
    }

    /// `SCRIPT LOAD`; Redis Cluster routes it to every primary.
    pub fn load_command(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.source);
        cmd
    }
}

/// Every script spanbuf runs.
pub struct Scripts {
    /// `lua/add_buffer.lua`: insert one subsegment (docs/design.md §5 step 4).
    pub add_buffer: LuaScript,
    /// `lua/flush_load.lua`: lock a segment and snapshot its index (§6 steps 2–3).
    pub flush_load: LuaScript,
    /// `lua/flush_done.lua`: precise cleanup after delivery (§6 step 6).
    pub flush_done: LuaScript,
    /// `lua/queue_remove.lua`: drop queue entries whose deadline is unchanged.
    pub queue_remove: LuaScript,
    /// `lua/lock_refresh.lua`: extend flush locks still held during a delivery.
    pub lock_refresh: LuaScript,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            add_buffer: LuaScript::new("add_buffer", include_str!("../../lua/add_buffer.lua")),
            flush_load: LuaScript::new("flush_load", include_str!("../../lua/flush_load.lua")),
            flush_done: LuaScript::new("flush_done", include_str!("../../lua/flush_done.lua")),
            queue_remove: LuaScript::new(
                "queue_remove",
                include_str!("../../lua/queue_remove.lua"),
            ),
            lock_refresh: LuaScript::new(
                "lock_refresh",
                include_str!("../../lua/lock_refresh.lua"),
            ),
        }
    }

    pub fn all(&self) -> [&LuaScript; 5] {
        [
            &self.add_buffer,
            &self.flush_load,
            &self.flush_done,
            &self.queue_remove,
            &self.lock_refresh,
        ]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/design.md §4: each script opens with a comment stating purpose, KEYS,
    /// ARGV, return value and slot.
    #[test]
    fn every_script_has_its_header() {
        for script in Scripts::new().all() {
            // A flags line (`#!lua flags=…`) may come first.
            let source = script.source();
            let source = match source.strip_prefix("#!lua") {
                Some(rest) => rest.split_once('\n').map_or("", |(_, body)| body),
                None => source,
            };
            assert!(
                source.starts_with("--[["),
                "{} must open with a comment",
                script.name
            );
            let header = source.split("]]").next().unwrap_or_default();
            for word in ["Purpose", "KEYS", "ARGV", "Returns", "slot"] {
                assert!(header.contains(word), "{} header lacks {word}", script.name);
            }
            assert_eq!(script.sha().len(), 40);
        }
    }
}
