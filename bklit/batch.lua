-- bklit: one call per reactor turn applies a batch of operations, in order.
--
-- Everything an accepted event changes in Redis happens here, atomically and
-- in one round trip: the stream entry, the live session state, the session
-- rows for ClickHouse, and the broadcast to dashboards on every node.
--
-- KEYS[1]  the events stream
-- ARGV[1]  how long (ms) an ended session may be resumed
-- ARGV[2…] operations back to back, each a code and a fixed number of args:
--   E entry channel message                          -> stream id
--   P entry channel head tail project session socket now url ua country country_code city
--        -> {stream id, 1 if the session started, 2 if it resumed, else 0}
--   X project session socket now ended reason channel message
--        (socket "" = end whatever sockets remain)   -> 1 if the session ended, else 0
--   H project session now                            -> 0
--   S key number   a batch's number (nodes with a spool send one first): -> 1, or
--                  0 when key holds a number at or above it: Redis applied that
--                  batch before, and its operations up to the next S are skipped (-> 0)
-- A channel of "" publishes nothing.

local stream = KEYS[1]
local resume_ms = tonumber(ARGV[1])
local out = {}

local function state_key(p, s) return 'bklit:session:' .. p .. ':' .. s end
local function sockets_key(p, s) return 'bklit:session:' .. p .. ':' .. s .. ':sockets' end
local function live_key(p) return 'live:sessions:' .. p end

local function read_state(key)
  local flat = redis.call('HGETALL', key)
  local st = {}
  for i = 1, #flat, 2 do st[flat[i]] = flat[i + 1] end
  return st
end

-- Row versions only grow, also across nodes and clock steps.
local function next_version(key, now)
  local v = tonumber(redis.call('HGET', key, 'version') or '0')
  if now > v then v = now else v = v + 1 end
  redis.call('HSET', key, 'version', v)
  return v
end

local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function seconds(ms) return math.floor(tonumber(ms) / 1000) end

local function session_row(p, s, st, ended, reason, now, version)
  local started = tonumber(st.started_at)
  local pageviews = tonumber(st.pageviews)
  local row = {
    id = s, session_id = s, project_id = p,
    started_at = seconds(started),
    ended_at = ended and seconds(ended) or cjson.null,
    duration = ended and math.max(0, seconds(ended) - seconds(started)) or 0,
    pageviews = pageviews,
    did_bounce = (pageviews <= 1) and 1 or 0,
    entry_page = st.entry_page, exit_page = st.exit_page, user_agent = st.user_agent,
    country = st.country, country_code = st.country_code, city = st.city,
    end_reason = reason, updated_at = seconds(now), version = version,
  }
  redis.call('XADD', stream, '*', 'e', cjson.encode({table = 'tracked_session', row = row}))
end

local function publish(channel, message)
  if channel ~= '' then redis.call('PUBLISH', channel, message) end
end

local function pageview(a)
  local entry, channel, head, tail, p, s, socket, now, url =
    a[1], a[2], a[3], a[4], a[5], a[6], a[7], tonumber(a[8]), a[9]
  local key = state_key(p, s)
  local st = read_state(key)
  local is_new = st.started_at == nil
  local resumed = (not is_new) and st.ended_at ~= nil
  if is_new then
    st = {started_at = now, entry_page = url, user_agent = a[10],
          country = a[11], country_code = a[12], city = a[13]}
    redis.call('HSET', key, 'started_at', now, 'entry_page', url, 'user_agent', a[10],
               'country', a[11], 'country_code', a[12], 'city', a[13])
  elseif resumed then
    redis.call('HDEL', key, 'ended_at', 'end_reason')
  end
  st.pageviews = redis.call('HINCRBY', key, 'pageviews', 1)
  st.exit_page = url
  redis.call('HSET', key, 'exit_page', url, 'last_seen', now)
  redis.call('PEXPIRE', key, resume_ms)
  redis.call('SADD', sockets_key(p, s), socket)
  redis.call('PEXPIRE', sockets_key(p, s), resume_ms)
  -- A pageview replayed from a spool is old: score it now, or the sweeper would end it at once.
  redis.call('ZADD', live_key(p), math.max(now, server_ms()), s)
  redis.call('SADD', 'bklit:projects:live', p)
  if is_new or resumed then session_row(p, s, st, nil, '', now, next_version(key, now)) end
  local id = redis.call('XADD', stream, '*', 'e', entry)
  publish(channel, head .. (is_new and 'true' or 'false') .. tail)
  return {id, is_new and 1 or (resumed and 2 or 0)}
end

local function end_session(a)
  local p, s, socket, now, ended, reason, channel, message =
    a[1], a[2], a[3], tonumber(a[4]), tonumber(a[5]), a[6], a[7], a[8]
  local key = state_key(p, s)
  if socket ~= '' then
    redis.call('SREM', sockets_key(p, s), socket)
    if redis.call('SCARD', sockets_key(p, s)) > 0 then return 0 end
  end
  redis.call('ZREM', live_key(p), s)
  if redis.call('ZCARD', live_key(p)) == 0 then redis.call('SREM', 'bklit:projects:live', p) end
  local st = read_state(key)
  if st.started_at == nil or st.ended_at ~= nil then return 0 end
  redis.call('DEL', sockets_key(p, s))
  redis.call('HSET', key, 'ended_at', ended, 'end_reason', reason)
  redis.call('PEXPIRE', key, resume_ms)
  session_row(p, s, st, ended, reason, now, next_version(key, now))
  publish(channel, message)
  return 1
end

local arity = {E = 3, P = 13, X = 8, H = 3, S = 2}
local skipping = false
local i = 2
while i <= #ARGV do
  local code = ARGV[i]
  local n = arity[code]
  if n == nil then return redis.error_reply('bklit batch: unknown operation ' .. tostring(code)) end
  local a = {}
  for k = 1, n do a[k] = ARGV[i + k] end
  if code == 'S' then
    skipping = tonumber(a[2]) <= tonumber(redis.call('GET', a[1]) or '0')
    if not skipping then redis.call('SET', a[1], a[2]) end
    out[#out + 1] = skipping and 0 or 1
  elseif skipping then
    out[#out + 1] = 0
  elseif code == 'E' then
    out[#out + 1] = redis.call('XADD', stream, '*', 'e', a[1])
    publish(a[2], a[3])
  elseif code == 'P' then
    out[#out + 1] = pageview(a)
  elseif code == 'X' then
    out[#out + 1] = end_session(a)
  else
    redis.call('ZADD', live_key(a[1]), 'XX', a[3], a[2])
    redis.call('PEXPIRE', state_key(a[1], a[2]), resume_ms)
    redis.call('PEXPIRE', sockets_key(a[1], a[2]), resume_ms)
    out[#out + 1] = 0
  end
  i = i + n + 1
end
return out
