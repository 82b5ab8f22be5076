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
-- Shared (read) tokens start with 's:'; every other token is exclusive.
local function is_shared(token)
  return string.sub(token, 1, 2) == 's:'
end
-- Whether the waiter's queue entry is still live; drops it from the line if not.
local function live_waiter(line, waiters, writers, token, now)
  local deadline = redis.call('ZSCORE', waiters, token)
  if deadline and tonumber(deadline) > now then return true end
  redis.call('ZREM', line, token)
  redis.call('ZREM', waiters, token)
  redis.call('ZREM', writers, token)
  return false
end
-- Removes waiters whose queue entry ran out from the head of the line; returns the first
-- live waiter's token, or nil when nobody waits.
local function live_head(line, waiters, writers)
  local now
  while true do
    local head = redis.call('ZRANGE', line, 0, 0)[1]
    if not head then return nil end
    now = now or now_ms()
    if live_waiter(line, waiters, writers, head, now) then return head end
  end
end
-- The place in line of the first live exclusive waiter (dropping those whose entry ran out
-- before it), or nil when none waits.
local function first_writer(line, waiters, writers)
  local now = now_ms()
  while true do
    local first = redis.call('ZRANGE', writers, 0, 0, 'WITHSCORES')
    if not first[1] then return nil end
    if live_waiter(line, waiters, writers, first[1], now) then return tonumber(first[2]) end
  end
end
-- Whether a live exclusive waiter is ahead of `token` in the line (anywhere in it, when
-- `token` is not in the line).
local function writer_ahead(line, waiters, writers, token)
  local writer = first_writer(line, waiters, writers)
  if not writer then return false end
  local place = redis.call('ZSCORE', line, token)
  return not place or writer < tonumber(place)
end
-- Drops shared holders whose lease ran out; returns how many hold the key.
local function live_readers(readers)
  if redis.call('EXISTS', readers) == 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', readers, '-inf', now_ms())
  return redis.call('ZCARD', readers)
end
-- Called with no exclusive holder: tells the waiters that may now go in, each on its own channel
-- `<prefix>:<token>`: the head of the line if it waits for the exclusive side and no shared
-- holder is left, or every waiter before the first exclusive one.
local function wake(line, waiters, writers, readers, prefix)
  local head = live_head(line, waiters, writers)
  if not head then return end
  if not is_shared(head) then
    if live_readers(readers) == 0 then redis.pcall('PUBLISH', prefix .. ':' .. head, head) end
    return
  end
  local writer = first_writer(line, waiters, writers)
  local before = '+inf'
  if writer then before = '(' .. writer end
  for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', line, '-inf', before)) do
    redis.pcall('PUBLISH', prefix .. ':' .. waiter, waiter)
  end
end
-- Sets the key of the shared holders to expire with the last of them.
local function expire_readers(readers)
  local last = redis.call('ZRANGE', readers, -1, -1, 'WITHSCORES')[2]
  if last then redis.call('PEXPIREAT', readers, last) end
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

/// KEYS: lock, fence, line, waiters, readers, writers.
/// ARGV: token (`s:…` for the shared side), ttl ms, queue entry ttl ms (0: do not queue),
/// fence retention ms.
/// Returns the fencing token (> 0) when taken. Otherwise `-pttl` of the lease the caller waits
/// for when it is next to go in (or did not queue), and 0 when it waits behind others or the
/// free lock is promised to waiters ahead of it.
const ACQUIRE_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
local token = ARGV[1]
local shared = is_shared(token)
local head = live_head(KEYS[3], KEYS[4], KEYS[6])
local first = not head or head == token
if shared then first = not writer_ahead(KEYS[3], KEYS[4], KEYS[6], token) end
if first then
  local taken = false
  if shared then
    if redis.call('EXISTS', KEYS[1]) == 0 then
      redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[2]), token)
      expire_readers(KEYS[5])
      taken = true
    end
  elseif live_readers(KEYS[5]) == 0 then
    taken = redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2])
  end
  if taken then
    if (shared or head == token) and redis.call('ZREM', KEYS[3], token) == 1 then
      redis.call('ZREM', KEYS[4], token)
      redis.call('ZREM', KEYS[6], token)
    end
    return next_fence(KEYS[2], ARGV[4])
  end
end
local entry_ttl = tonumber(ARGV[3])
if entry_ttl > 0 then
  if not redis.call('ZSCORE', KEYS[3], token) then
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
    local place = (tonumber(last) or 0) + 1
    redis.call('ZADD', KEYS[3], place, token)
    if not shared then
      redis.call('ZADD', KEYS[6], place, token)
      first = (head or token) == token
    end
  end
  redis.call('ZADD', KEYS[4], now_ms() + entry_ttl, token)
  local latest = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2]
  redis.call('PEXPIREAT', KEYS[3], latest)
  redis.call('PEXPIREAT', KEYS[4], latest)
  redis.call('PEXPIREAT', KEYS[6], latest)
  if not first then return 0 end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then return -pttl end
if not shared then
  pttl = redis.call('PTTL', KEYS[5])
  if pttl > 0 then return -pttl end
end
return 0
"#
);

/// KEYS: lock, line, waiters, readers, writers. ARGV: token, channel prefix (a waiter is told on
/// `<prefix>:<its token>`).
/// Returns 1 when the token held the key (now released), 0 otherwise (nothing changed).
const RELEASE_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
if is_shared(ARGV[1]) then
  local expiry = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not expiry or tonumber(expiry) <= now_ms() then return 0 end
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[1])
end
wake(KEYS[2], KEYS[3], KEYS[5], KEYS[4], ARGV[2])
return 1
"#
);

/// KEYS: lock, fence, line, waiters, readers, writers. ARGV: holder token, next token, ttl ms, fence
/// retention ms, channel prefix.
/// An exclusive holder passes the lock to the next task of its own process in one call, unless
/// waiters in the line come first. Returns the next holder's fencing token (> 0) when passed;
/// 0 when released to the line instead (its waiters told on their channels); -1 when the
/// holder's token does not hold the lock (nothing changed).
const HAND_OVER_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if live_head(KEYS[3], KEYS[4], KEYS[6]) then
  redis.call('DEL', KEYS[1])
  wake(KEYS[3], KEYS[4], KEYS[6], KEYS[5], ARGV[5])
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return next_fence(KEYS[2], ARGV[4])
"#
);

/// KEYS: lock, readers. ARGV: token, ttl ms. Returns 1 when renewed, 0 when the token does not
/// hold the key.
const EXTEND_SOURCE: &str = r#"
local token = ARGV[1]
if string.sub(token, 1, 2) ~= 's:' then
  if redis.call('GET', KEYS[1]) ~= token then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[2], token)
if not expiry or tonumber(expiry) <= now then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), token)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]
redis.call('PEXPIREAT', KEYS[2], last)
return 1
"#;

/// KEYS: lock, line, waiters, readers, writers. ARGV: token, channel prefix.
/// A waiter gives up: leaves the line, releases the key if an interrupted acquire took it, and
/// tells the waiters that may then go in. Returns 1 if it released the key.
const ABANDON_SOURCE: &str = concat!(
    queue_helpers!(),
    r#"
local held
if is_shared(ARGV[1]) then
  held = redis.call('ZREM', KEYS[4], ARGV[1]) == 1
elseif redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  held = true
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then wake(KEYS[2], KEYS[3], KEYS[5], KEYS[4], ARGV[2]) end
if held then return 1 end
return 0
"#
);

/// KEYS: lock, waiters, readers. Returns 1 when the key has a holder of either side, or is free
/// but promised to a live waiter.
const IS_LOCKED_SOURCE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') > 0 then return 1 end
if redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') > 0 then return 1 end
return 0
"#;

/// Helpers every permit script has after the queue helpers. A permit's line has no exclusive
/// waiters to find, so it keeps no `writers` set and drops gone waiters its own way.
macro_rules! permit_helpers {
    () => {
        r#"
-- Drops every waiter of a permits' line whose place ran out (each once, when first seen gone).
local function drop_gone_waiters(line, waiters, now)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', waiters, '-inf', now)) do
    redis.call('ZREM', line, gone)
    redis.call('ZREM', waiters, gone)
  end
end
-- Tells the first live waiter of a permits' line to look again, on its channel
-- `<prefix>:<token>`.
local function wake_first(line, waiters, prefix, now)
  drop_gone_waiters(line, waiters, now)
  local first = redis.call('ZRANGE', line, 0, 0)[1]
  if first then redis.pcall('PUBLISH', prefix .. ':' .. first, first) end
end
"#
    };
}

/// KEYS: permits, fence, line, waiters (the permit names of the key).
/// ARGV: token (`s:…`), ttl ms, queue entry ttl ms (0: do not queue), fence retention ms,
/// limit, channel prefix.
/// A caller gets a permit while the live holders and the waiters ahead of it in the line
/// (the whole line, for a caller not in it) are fewer than its limit. Returns the fencing token
/// (> 0) when taken. Otherwise `-pttl` of the first holder's lease when nobody waits ahead of
/// the caller, and 0 when others wait ahead of it (or nobody holds a permit).
const PERMIT_ACQUIRE_SOURCE: &str = concat!(
    queue_helpers!(),
    permit_helpers!(),
    r#"
local token = ARGV[1]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
drop_gone_waiters(KEYS[3], KEYS[4], now)
local place = redis.call('ZSCORE', KEYS[3], token)
local ahead
if place then
  ahead = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. place)
else
  ahead = redis.call('ZCARD', KEYS[3])
end
if redis.call('ZCARD', KEYS[1]) + ahead < tonumber(ARGV[5]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), token)
  expire_readers(KEYS[1])
  if place then
    redis.call('ZREM', KEYS[3], token)
    redis.call('ZREM', KEYS[4], token)
    wake_first(KEYS[3], KEYS[4], ARGV[6], now)
  end
  return next_fence(KEYS[2], ARGV[4])
end
local entry_ttl = tonumber(ARGV[3])
if entry_ttl > 0 then
  if not place then
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
    redis.call('ZADD', KEYS[3], (tonumber(last) or 0) + 1, token)
  end
  redis.call('ZADD', KEYS[4], now + entry_ttl, token)
  local latest = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2]
  redis.call('PEXPIREAT', KEYS[3], latest)
  redis.call('PEXPIREAT', KEYS[4], latest)
  if ahead > 0 then return 0 end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
if first then return now - tonumber(first) end
return 0
"#
);

/// KEYS: permits, line, waiters. ARGV: token, channel prefix.
/// Returns 1 when the token held a live permit (now released, the first waiter told), 0
/// otherwise (nothing changed).
const PERMIT_RELEASE_SOURCE: &str = concat!(
    queue_helpers!(),
    permit_helpers!(),
    r#"
local now = now_ms()
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
wake_first(KEYS[2], KEYS[3], ARGV[2], now)
return 1
"#
);

/// KEYS: permits, line, waiters. ARGV: token, channel prefix.
/// A waiter gives up: leaves the line, gives back the permit an interrupted acquire may have
/// taken, and tells the first waiter if either freed room. Returns 1 if it gave a permit back.
const PERMIT_ABANDON_SOURCE: &str = concat!(
    queue_helpers!(),
    permit_helpers!(),
    r#"
local held = redis.call('ZREM', KEYS[1], ARGV[1])
local queued = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if held + queued > 0 then wake_first(KEYS[2], KEYS[3], ARGV[2], now_ms()) end
return held
"#
);

/// KEYS: permits. Returns how many permits of the key are held (live leases).
const PERMITS_HELD_SOURCE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
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
pub(crate) static PERMIT_ACQUIRE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("permit_acquire", PERMIT_ACQUIRE_SOURCE));
pub(crate) static PERMIT_RELEASE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("permit_release", PERMIT_RELEASE_SOURCE));
pub(crate) static PERMIT_ABANDON: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("permit_abandon", PERMIT_ABANDON_SOURCE));
pub(crate) static PERMITS_HELD: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("permits_held", PERMITS_HELD_SOURCE));

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

    fn all_scripts() -> [&'static LuaScript; 10] {
        [
            &ACQUIRE,
            &RELEASE,
            &HAND_OVER,
            &EXTEND,
            &ABANDON,
            &IS_LOCKED,
            &PERMIT_ACQUIRE,
            &PERMIT_RELEASE,
            &PERMIT_ABANDON,
            &PERMITS_HELD,
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
    /// text (the queue helpers once, the permit helpers once, then each script's own part) and
    /// its SHA1.
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
        let permit_helpers = permit_helpers!().trim();
        assert_eq!(block_after("### Permit helpers"), permit_helpers);
        let all = all_scripts();
        for script in all {
            let own_part = script
                .source
                .trim_start()
                .strip_prefix(helpers)
                .unwrap_or(script.source);
            let own_part = own_part
                .trim_start()
                .strip_prefix(permit_helpers)
                .unwrap_or(own_part);
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
