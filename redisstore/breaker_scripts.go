package redisstore

import "github.com/redis/go-redis/v9"

// The scripts of the shared breaker state: each runs in Redis, atomically,
// on Redis's clock.

// publishScript writes a breaker state unless Redis holds a newer one, or
// the same one, and publishes what it wrote. An open over an open still in
// force is the same one, unless it comes from a failed probe, or ends
// later by more than a SyncInterval: a retry hint's longer period, from a
// replica that opened on its own while another's open was on its way.
// Ends a few ms apart are one open seen twice (a replica's announce racing
// its own event, a missed expectation), not worth a message. An open not
// written over another replica's open in force returns that one's end as a
// fourth value, for the replica to adopt: a replica that tripped on its own
// a little after the fleet ends its open with the fleet's. A
// replica that leaves half-open releases the probe lock it holds in the
// same step.
//
// A transition time later than Redis's now is taken as now: a replica's
// clock ahead of Redis's must not push an open's end, and with it every
// replica's half-open round, into the future.
//
// The hash it writes expires after the idle period, or when the open it
// writes ends if that is later: an open must outlive a short idle period,
// or a replica that asks for the probe after the hash expired would find
// no open and probe before the fleet's end.
//
// KEYS: state hash, probe lock. ARGV: state, open period ms (0: not
// known), transition time ms ("" for Redis's clock), origin, epoch for a new
// hash, channel, breaker key, idle period ms, "1" if the breaker left
// half-open (a failed probe: a new open, to be written even over an open),
// how much later an open must end to be written over one in force, ms.
var publishScript = redis.NewScript(`
if ARGV[1] ~= 'half-open' and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now
if ARGV[3] ~= '' then at = math.min(tonumber(ARGV[3]), now) end
local ends = 0
if ARGV[1] == 'open' and tonumber(ARGV[2]) > 0 then ends = at + tonumber(ARGV[2]) end
local cur = redis.call('HMGET', KEYS[1], 'state', 'until', 'at', 'epoch', 'gen', 'origin')
if cur[1] then
  if tonumber(cur[3]) > at then return {0, cur[4], cur[5]} end
  if cur[1] == ARGV[1] then
    if ARGV[1] ~= 'open' then return {0, cur[4], cur[5]} end
    local u = tonumber(cur[2])
    if ARGV[9] ~= '1' and (u == 0 or (u > now and ends <= u + tonumber(ARGV[10]))) then
      if cur[6] == ARGV[4] then return {0, cur[4], cur[5]} end
      return {0, cur[4], cur[5], u}
    end
  end
end
local epoch = cur[4] or ARGV[5]
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'until', ends, 'at', at, 'origin', ARGV[4], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[8]), ends - now))
redis.call('PUBLISH', ARGV[6], epoch .. ' ' .. gen .. ' ' .. ARGV[1] .. ' ' .. ends .. ' ' .. at .. ' ' .. ARGV[4] .. ' ' .. ARGV[7])
return {1, epoch, gen}
`)

// probeScript takes the probe lock for a replica, or renews it if the
// replica holds it already, unless the shared state is an open still in
// force: the shared state, not each replica's clock, decides when a
// half-open round begins. Without that check a replica whose own
// open ended a little after the fleet's could take the lock that a failed
// probe had just released, and send a second probe in the round. It
// returns {1} when this replica holds the lock, {0, ms} when another
// replica holds it for ms more, and {2, until} while the shared open lasts
// until the unix ms until, by Redis's clock.
//
// KEYS: probe lock, state hash. ARGV: replica id, ttl ms.
var probeScript = redis.NewScript(`
local st = redis.call('HMGET', KEYS[2], 'state', 'until')
if st[1] == 'open' and st[2] then
  local u = tonumber(st[2])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if u and u > now then return {2, u} end
end
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then ttl = 0 end
return {0, ttl}
`)

// releaseProbeScript deletes the probe lock if the replica holds it.
//
// KEYS: probe lock. ARGV: replica id.
var releaseProbeScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`)
