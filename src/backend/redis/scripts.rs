//! The Lua scripts of the protocol, and running them by `EVALSHA`, by `EVAL` after a `NOSCRIPT`.
//!
//! docs/redis.md describes the same scripts for clients in other languages; keep both in step.

use std::sync::LazyLock;

use tokio::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisWrite, ServerErrorKind, ToRedisArgs};

/// Helpers every queue-aware script starts with.
macro_rules! queue_helpers {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Removes waiters whose queue entry ran out from the head of the line; returns the first
-- live waiter's token, or nil when nobody waits.
local function live_head(line, waiters)
  local now
  while true do
    local head = redis.call('ZRANGE', line, 0, 0)[1]
    if not head then return nil end
    now = now or now_ms()
    local deadline = redis.call('ZSCORE', waiters, head)
    if deadline and tonumber(deadline) > now then return head end
    redis.call('ZREM', line, head)
    redis.call('ZREM', waiters, head)
  end
end
-- The next fencing token: the larger of the last token + 1 and the server clock in
-- microseconds, so that a counter that came back older (a restart from a snapshot, a
-- promoted replica that missed writes) or went away cannot hand out a token again.
local function next_fence(fence, retention)
  local t = redis.call('TIME')
  local token = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('SET', fence, string.format('%d', token), 'PX', retention, 'GET'))
  if last and last >= token then
    token = last + 1
    redis.call('SET', fence, string.format('%d', token), 'PX', retention)
  end
  return token
end
"#
    };
}

/// KEYS: lock, fence, line, waiters.
/// ARGV: token, ttl ms, queue entry ttl ms (0: do not queue), fence retention ms.
/// Returns the fencing token (> 0) when taken. Otherwise `-pttl` of the holder when the caller
/// is next in line (or did not queue), and 0 when it waits behind others or the free lock is
/// promised to the waiter at the head of the line.
const ACQUIRE_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
local token = ARGV[1]
local head = live_head(KEYS[3], KEYS[4])
if (not head or head == token) and redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2]) then
  if head then
    redis.call('ZREM', KEYS[3], token)
    redis.call('ZREM', KEYS[4], token)
  end
  return next_fence(KEYS[2], ARGV[4])
end
local entry_ttl = tonumber(ARGV[3])
if entry_ttl > 0 then
  if not redis.call('ZSCORE', KEYS[3], token) then
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
    redis.call('ZADD', KEYS[3], (tonumber(last) or 0) + 1, token)
    head = head or token
  end
  redis.call('ZADD', KEYS[4], now_ms() + entry_ttl, token)
  local latest = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2]
  redis.call('PEXPIREAT', KEYS[3], latest)
  redis.call('PEXPIREAT', KEYS[4], latest)
  if head ~= token then return 0 end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then return -pttl end
return 0
"#
);

/// KEYS: lock, line, waiters. ARGV: token, channel prefix (the head of the line is told on
/// `<prefix>:<its token>`).
/// Returns 1 when the token held the lock (now deleted), 0 otherwise (nothing changed).
const RELEASE_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local head = live_head(KEYS[2], KEYS[3])
if head then redis.pcall('PUBLISH', ARGV[2] .. ':' .. head, head) end
return 1
"#
);

/// KEYS: lock, fence, line, waiters. ARGV: holder token, next token, ttl ms, fence retention
/// ms, channel prefix.
/// The holder passes the lock to the next task of its own process in one call, unless waiters
/// in the line come first. Returns the next holder's fencing token (> 0) when passed; 0 when
/// released to the head of the line instead (told on its channel); -1 when the holder's token
/// does not hold the lock (nothing changed).
const HAND_OVER_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local head = live_head(KEYS[3], KEYS[4])
if head then
  redis.call('DEL', KEYS[1])
  redis.pcall('PUBLISH', ARGV[5] .. ':' .. head, head)
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return next_fence(KEYS[2], ARGV[4])
"#
);

/// KEYS: lock. ARGV: token, ttl ms. Returns 1 when renewed, 0 when the token does not hold it.
const EXTEND_SOURCE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// KEYS: lock, line, waiters. ARGV: token, channel prefix.
/// A waiter gives up: leaves the line, releases the lock if an interrupted acquire took it,
/// and wakes the next waiter when the lock is free. Returns 1 if it released the lock.
const ABANDON_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
local held = redis.call('GET', KEYS[1]) == ARGV[1]
if held then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  local head = live_head(KEYS[2], KEYS[3])
  if head then redis.pcall('PUBLISH', ARGV[2] .. ':' .. head, head) end
end
if held then return 1 end
return 0
"#
);

/// KEYS: lock, waiters. Returns 1 when the lock is held, or free but promised to a live waiter.
const IS_LOCKED_SOURCE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') > 0 then return 1 end
return 0
"#;

/// One Lua script and its SHA1 digest.
pub(crate) struct LuaScript {
    pub(crate) name: &'static str,
    pub(crate) source: &'static str,
    pub(crate) sha1: String,
}

impl LuaScript {
    fn new(name: &'static str, source: &'static str) -> Self {
        LuaScript {
            name,
            source,
            sha1: redis::Script::new(source).get_hash().to_owned(),
        }
    }
}

pub(crate) static ACQUIRE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("acquire", ACQUIRE_SOURCE));
pub(crate) static RELEASE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("release", RELEASE_SOURCE));
pub(crate) static HAND_OVER: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("hand_over", HAND_OVER_SOURCE));
pub(crate) static EXTEND: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("extend", EXTEND_SOURCE));
pub(crate) static ABANDON: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("abandon", ABANDON_SOURCE));
pub(crate) static IS_LOCKED: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("is_locked", IS_LOCKED_SOURCE));

/// A script argument: text or a number (the redis crate writes both without allocating).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Text(&'a str),
    Number(u64),
}

impl ToRedisArgs for Arg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        match *self {
            Arg::Text(text) => text.write_redis_args(out),
            Arg::Number(number) => number.write_redis_args(out),
        }
    }
}

/// `EVALSHA` (`cached`) or `EVAL` with the source of `script`, on `keys` and `args`.
fn eval(script: &LuaScript, cached: bool, keys: &[&str], args: &[Arg<'_>]) -> Cmd {
    let mut cmd = if cached {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha1);
        cmd
    } else {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script.source);
        cmd
    };
    cmd.arg(keys.len()).arg(keys).arg(args);
    cmd
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Runs `script` by `EVALSHA`; if the server does not know it (`NOSCRIPT`: restarted, flushed,
/// or another node), sends it again as `EVAL` with its source, which also caches it: one more
/// round trip, on a command that carries its keys (a routing proxy can place it). Returns the
/// script's result and when the command that ran it was sent.
pub(crate) async fn run_script(
    connection: &mut MultiplexedConnection,
    script: &LuaScript,
    keys: &[&str],
    args: &[Arg<'_>],
) -> Result<(i64, Instant), RedisError> {
    let sent_at = Instant::now();
    match eval(script, true, keys, args).query_async(connection).await {
        Err(error) if is_noscript(&error) => {
            tracing::debug!(
                script = script.name,
                "script not cached by the server; sending its source"
            );
            let sent_at = Instant::now();
            let value = eval(script, false, keys, args)
                .query_async(connection)
                .await?;
            Ok((value, sent_at))
        }
        other => other.map(|value| (value, sent_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_scripts() -> [&'static LuaScript; 6] {
        [
            &ACQUIRE, &RELEASE, &HAND_OVER, &EXTEND, &ABANDON, &IS_LOCKED,
        ]
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 1_234_567, u64::MAX] {
            assert_eq!(
                Arg::Number(n).to_redis_args(),
                vec![n.to_string().into_bytes()]
            );
        }
    }

    /// docs/redis.md, the reference for clients in other languages, gives every script's exact
    /// text (the queue helpers once, then each script's own part) and its SHA1.
    #[test]
    fn the_docs_give_every_script_and_its_sha1() {
        let docs = include_str!("../../../docs/redis.md");
        let block_after = |heading: &str| {
            let start = docs.find(heading).expect(heading) + heading.len();
            let code = docs[start..].find("```lua\n").expect("a lua block") + start + 7;
            let end = docs[code..].find("```").expect("the end of the block") + code;
            docs[code..end].trim().to_owned()
        };
        let helpers = queue_helpers!().trim();
        assert_eq!(block_after("## Scripts"), helpers);
        let all = all_scripts();
        for script in all {
            let own_part = script
                .source
                .trim_start()
                .strip_prefix(helpers)
                .unwrap_or(script.source);
            assert_eq!(
                block_after(&format!("### {}", script.name)),
                own_part.trim(),
                "docs/redis.md gives another text for {}",
                script.name
            );
            let row = format!("| {} | `{}` |", script.name, script.sha1);
            assert!(docs.contains(&row), "docs/redis.md lacks the row {row}");
        }
    }

    #[test]
    fn scripts_have_distinct_digests() {
        let all = all_scripts();
        let digests: std::collections::HashSet<_> = all.iter().map(|s| &s.sha1).collect();
        assert_eq!(digests.len(), all.len());
        assert!(all.iter().all(|s| s.sha1.len() == 40));
    }
}
