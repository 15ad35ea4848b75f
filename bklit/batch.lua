-- bklit: one call per reactor turn applies a batch of operations, in order.
--
-- Everything an accepted event changes in Redis happens here, in one round
-- trip: the stream entry, the live session state, the session rows for
-- ClickHouse, and the broadcast to dashboards on every node.
--
-- Each operation applies wholly or not at all, alone: it first checks that
-- every key it touches is absent or of its kind, then writes.  An operation
-- Redis refuses (a key of the wrong type, planted by hand or left by an old
-- layout) answers "!" .. the reason in its own place of the reply, and the
-- others go on.  (Redis does not roll a script back: a refusal must come
-- before the operation's first write.)  An error that says Redis cannot
-- take writes now (out of memory, a read-only replica) before anything was
-- applied fails the whole call, so the caller can spool it and retry.
--
-- KEYS[1]  the events stream
-- KEYS[2]  the set of projects with live sessions
-- ARGV[1]  how long (ms) an ended session may be resumed
-- ARGV[2…6] key prefixes, from bklit/keys.py (SCRIPT_PREFIXES): session state,
--          session sockets, live sessions, live bot sessions, layout 1's state
-- ARGV[7…] one operation each: a code and its fields, joined by "\31" (the
--          unit separator, which no field holds):
--   E entry channel message                          -> stream id
--   P entry channel head tail project session socket now url ua country country_code city bot
--        -> {stream id, 1 if the session started, 2 if it resumed, else 0}
--   X project session socket now ended reason channel message
--        (socket "" = end whatever sockets remain)   -> 1 if the session ended, else 0
--   H project session now                            -> 0
--   S key number   a batch's number (nodes with a spool send one first): -> 1, or
--                  0 when key holds a number at or above it: Redis applied that
--                  batch before, and its operations up to the next S are skipped (-> 0).
--                  The number is recorded once the batch's operations ran.
-- A channel of "" publishes nothing.

local stream, projects = KEYS[1], KEYS[2]
local resume_ms = tonumber(ARGV[1])
local STATE, SOCKETS, LIVE, BOTS, LEGACY = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local FIRST_OP = 7
local TRANSIENT = {OOM = true, BUSY = true, LOADING = true, READONLY = true, MASTERDOWN = true,
                   TRYAGAIN = true, NOREPLICAS = true, CLUSTERDOWN = true}
local out = {}

local function state_key(p, s) return STATE .. p .. ':' .. s end
local function sockets_key(p, s) return SOCKETS .. p .. ':' .. s end

-- Refuse the operation unless each key is absent or of its kind (a key's
-- kind cannot change within the call, so each is asked once).
local known = {}
local function expect(...)
  local pairs_ = {...}
  for i = 1, #pairs_, 2 do
    local key, kind = pairs_[i], pairs_[i + 1]
    if not known[key] then
      local t = redis.call('TYPE', key)['ok']
      if t ~= 'none' and t ~= kind then
        error({err = 'WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. kind})
      end
      known[key] = true
    end
  end
end

-- A session's keys checked, and its state (a session live at the upgrade
-- from layout 1 is carried over: its old hash becomes the new one).
local function session(p, s)
  local key, sockets = state_key(p, s), sockets_key(p, s)
  expect(key, 'hash', sockets, 'set', LIVE .. p, 'zset', BOTS .. p, 'zset', projects, 'set', stream, 'stream')
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    local old = LEGACY .. p .. ':' .. s
    if redis.call('TYPE', old)['ok'] == 'hash' then
      redis.call('RENAME', old, key)
      redis.call('HSET', key, 'row', 'legacy')
      flat = redis.call('HGETALL', key)
    end
  end
  local st = {}
  for i = 1, #flat, 2 do st[flat[i]] = flat[i + 1] end
  return key, sockets, st
end

-- Row versions only grow, also across nodes and clock steps.
local function next_version(key, now)
  local v = tonumber(redis.call('HGET', key, 'version') or '0')
  if now > v then v = now else v = v + 1 end
  redis.call('HSET', key, 'version', v)
  return v
end

-- Redis's clock, asked once per call (a call is one reactor turn of one node).
local clock_ms = nil
local function server_ms()
  if clock_ms == nil then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end

-- The projects set gets each project once per call.
local listed = {}
local function list_project(p)
  if not listed[p] then
    redis.call('SADD', projects, p)
    listed[p] = true
  end
end

local function seconds(ms) return math.floor(tonumber(ms) / 1000) end

-- A visit's row: keyed by the session and its start, so a session id that
-- comes back after its state expired is a new row (a session carried over
-- from layout 1 keeps its old row: id = session id, started_ms = 0).
local function session_row(p, s, st, ended, reason, now, version)
  local started = tonumber(st.started_at)
  local pageviews = tonumber(st.pageviews)
  local legacy = st.row == 'legacy'
  local row = {
    id = legacy and s or (s .. '/' .. string.format('%d', started)),
    session_id = s, project_id = p,
    started_ms = legacy and 0 or started,
    started_at = seconds(started),
    ended_at = ended and seconds(ended) or cjson.null,
    duration = ended and math.max(0, seconds(ended) - seconds(started)) or 0,
    pageviews = pageviews,
    did_bounce = (pageviews <= 1) and 1 or 0,
    entry_page = st.entry_page, exit_page = st.exit_page, user_agent = st.user_agent,
    country = st.country, country_code = st.country_code, city = st.city,
    is_bot = (st.bot == '1') and 1 or 0,
    end_reason = reason, updated_at = seconds(now), version = version,
  }
  redis.call('XADD', stream, '*', 'e', cjson.encode({table = 'tracked_session', row = row}))
end

local function publish(channel, message)
  if channel ~= '' then redis.call('PUBLISH', channel, message) end
end

local function event(a)
  expect(stream, 'stream')
  local id = redis.call('XADD', stream, '*', 'e', a[1])
  publish(a[2], a[3])
  return id
end

local function pageview(a)
  local entry, channel, head, tail, p, s, socket, now, url, bot =
    a[1], a[2], a[3], a[4], a[5], a[6], a[7], tonumber(a[8]), a[9], a[14]
  local key, sockets, st = session(p, s)
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
  if bot == '1' and st.bot ~= '1' then  -- a later pageview showed a bot: live apart from now on
    st.bot = '1'
    redis.call('HSET', key, 'bot', '1')
    redis.call('ZREM', LIVE .. p, s)
  end
  st.pageviews = (tonumber(st.pageviews) or 0) + 1
  st.exit_page = url
  redis.call('HSET', key, 'pageviews', st.pageviews, 'exit_page', url, 'last_seen', now)
  redis.call('PEXPIRE', key, resume_ms)
  redis.call('SADD', sockets, socket)
  redis.call('PEXPIRE', sockets, resume_ms)
  -- A pageview replayed from a spool is old: score it now, or the sweeper would end it at once.
  redis.call('ZADD', (st.bot == '1' and BOTS or LIVE) .. p, math.max(now, server_ms()), s)
  list_project(p)
  if is_new or resumed then session_row(p, s, st, nil, '', now, next_version(key, now)) end
  local id = redis.call('XADD', stream, '*', 'e', entry)
  publish(channel, head .. (is_new and 'true' or 'false') .. tail)
  return {id, is_new and 1 or (resumed and 2 or 0)}
end

local function end_session(a)
  local p, s, socket, now, ended, reason, channel, message =
    a[1], a[2], a[3], tonumber(a[4]), tonumber(a[5]), a[6], a[7], a[8]
  local key, sockets, st = session(p, s)
  if socket ~= '' then
    redis.call('SREM', sockets, socket)
    if redis.call('SCARD', sockets) > 0 then return 0 end
  end
  redis.call('ZREM', LIVE .. p, s)
  redis.call('ZREM', BOTS .. p, s)
  if redis.call('ZCARD', LIVE .. p) + redis.call('ZCARD', BOTS .. p) == 0 then
    redis.call('SREM', projects, p)
    listed[p] = nil
  end
  if st.started_at == nil or st.ended_at ~= nil then return 0 end
  redis.call('DEL', sockets)
  redis.call('HSET', key, 'ended_at', ended, 'end_reason', reason)
  redis.call('PEXPIRE', key, resume_ms)
  session_row(p, s, st, ended, reason, now, next_version(key, now))
  publish(channel, message)
  return 1
end

local function heartbeat(a)
  local p, s = a[1], a[2]
  expect(LIVE .. p, 'zset', BOTS .. p, 'zset')
  redis.call('ZADD', LIVE .. p, 'XX', a[3], s)
  redis.call('ZADD', BOTS .. p, 'XX', a[3], s)
  redis.call('PEXPIRE', state_key(p, s), resume_ms)
  redis.call('PEXPIRE', sockets_key(p, s), resume_ms)
  return 0
end

local apply = {E = event, P = pageview, X = end_session, H = heartbeat}
local arity = {E = 3, P = 14, X = 8, H = 3, S = 2}
local skipping = false
local applied_any = false
local number_key, number = nil, nil

local function record_number()
  if number_key ~= nil then redis.call('SET', number_key, number) end
  number_key = nil
end

-- An operation's code and its fields.
local function split(op)
  local fields, from = {}, 1
  while true do
    local at = string.find(op, '\31', from, true)
    if at == nil then
      fields[#fields + 1] = string.sub(op, from)
      return table.remove(fields, 1), fields
    end
    fields[#fields + 1] = string.sub(op, from, at - 1)
    from = at + 1
  end
end

for i = FIRST_OP, #ARGV do
  local code, a = split(ARGV[i])
  local n = arity[code]
  if n == nil then return redis.error_reply('bklit batch: unknown operation ' .. tostring(code)) end
  if #a ~= n then return redis.error_reply('bklit batch: operation ' .. code .. ' needs ' .. n .. ' fields') end
  if code == 'S' then
    record_number()
    skipping = tonumber(a[2]) <= tonumber(redis.call('GET', a[1]) or '0')
    if not skipping then number_key, number = a[1], a[2] end
    out[#out + 1] = skipping and 0 or 1
  elseif skipping then
    out[#out + 1] = 0
  else
    local ok, result = pcall(apply[code], a)
    if ok then
      applied_any = true
      out[#out + 1] = result
    else
      local reason = type(result) == 'table' and tostring(result.err) or tostring(result)
      if not applied_any and TRANSIENT[string.match(reason, '^(%u+)') or ''] then
        return redis.error_reply(reason)
      end
      out[#out + 1] = '!' .. reason
    end
  end
end
record_number()
return out
