//! The Lua scripts framegate runs in Redis: each operation of `gw.shared` and `gw.limit` is
//! one script, so that it is atomic and takes one round trip. They run on Redis's Lua 5.1,
//! where numbers are doubles: counts are exact up to 2^53.
//!
//! A leased count (`incr` with `{lease = true}`) is a hash: one field per live instance
//! (`name#incarnation`), holding that instance's share. Its value is the sum of the shares of
//! instances whose lease key (`<prefix>live:<member>`) still exists; the scripts drop the
//! shares of the others as they meet them. The scripts read lease keys they are not given as
//! KEYS: a Redis Cluster needs the keys of one fleet in one slot (a `{tag}` in `key_prefix`).

use redis::Script;

/// The sum of a leased count's live shares, dropping dead ones (`k`: the key, `live`: the
/// lease keys' prefix). Shared by the scripts below.
const SUM_LIVE: &str = r"
local function sum_live(k, live)
  local all = redis.call('HGETALL', k)
  local sum = 0
  for i = 1, #all, 2 do
    if redis.call('EXISTS', live .. all[i]) == 1 then
      sum = sum + tonumber(all[i + 1])
    else
      redis.call('HDEL', k, all[i])
    end
  end
  return sum
end
local function text(n)
  if n == math.floor(n) and math.abs(n) < 2^53 then return string.format('%d', n) end
  return string.format('%.17g', n)
end
";

/// The scripts, loaded once per process (`EVALSHA`, loaded again on `NOSCRIPT`).
pub(super) struct Scripts {
    /// KEYS[1]; ARGV[1]: the lease keys' prefix. The value's text, or nil.
    pub(super) get: Script,
    /// KEYS[1]; ARGV: by, ttl in ms (0: none), "f" for a float increment. The new value.
    pub(super) incr: Script,
    /// KEYS[1]; ARGV: by, ttl in ms (0: none), member, lease keys' prefix, "f" for a float.
    /// The new sum of the live shares.
    pub(super) incr_leased: Script,
    /// KEYS[1]: the bucket; ARGV: rate, burst, tokens wanted. The tokens granted.
    pub(super) take: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            get: Script::new(&format!(
                "{SUM_LIVE}
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' then return redis.call('GET', KEYS[1]) end
if t == 'hash' then return text(sum_live(KEYS[1], ARGV[1])) end
return false"
            )),
            incr: Script::new(
                r"
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  return redis.error_reply('the value is a leased count: incr it with {lease = true}')
end
local cur = redis.call('GET', KEYS[1])
if cur and not tonumber(cur) then
  return redis.error_reply('the value is not a number')
end
local v
if ARGV[3] == 'f' or (cur and string.find(cur, '[.eEn]')) then
  v = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
else
  v = redis.call('INCRBY', KEYS[1], ARGV[1])
end
if not cur and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return tostring(v)",
            ),
            incr_leased: Script::new(&format!(
                "{SUM_LIVE}
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'hash' and t ~= 'none' then
  return redis.error_reply('the value is not a leased count: incr it without lease')
end
local share
if ARGV[5] == 'f' then
  share = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], ARGV[3], ARGV[1]))
else
  share = redis.call('HINCRBY', KEYS[1], ARGV[3], ARGV[1])
end
if share == 0 then redis.call('HDEL', KEYS[1], ARGV[3]) end
if t == 'none' and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return text(sum_live(KEYS[1], ARGV[4]))"
            )),
            take: Script::new(
                r"
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local grant = math.max(0, math.min(math.floor(tokens), want))
tokens = tokens - grant
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return grant",
            ),
        }
    }
}
