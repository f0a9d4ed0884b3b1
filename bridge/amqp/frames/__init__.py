"""AMQP 0-9-1 frames, encoded and decoded without I/O.

The one codec of the project's data path: :mod:`bridge.amqp.link` writes what this module
encodes and feeds it what the socket reads. It knows the methods the workers use (the
connection and channel handshake and close, heartbeats, qos, queue declare/bind,
consume/cancel and the broker's cancel notification, publish, deliver and return with their
content, ack/nack/reject, confirm select, connection.blocked/unblocked); a method it does
not know decodes to :class:`UnknownMethod` instead of failing.

Its modules, in the order they build on each other: ``tables`` (field tables and values, the
errors), ``methods``, ``properties`` (the content header), ``framing`` (frames out, and the
incremental :class:`Decoder` of frames in). This package's namespace is the public API.

Promises, each tested in tests/unit/amqp/test_frames.py:

- encodings are byte for byte what pamqp writes, wherever pamqp can encode the value; it
  also encodes what RabbitMQ accepts and pamqp refuses (any exchange or routing key up to
  255 bytes of UTF-8, header values that are ``bytes``);
- decoding never raises anything but :class:`DecodeError`, whatever the bytes and however
  they are split across reads; tables nest at most :data:`MAX_DEPTH` levels;
- a content header whose headers table cannot be decoded (nested too deep, malformed) does
  not fail the frame stream: the delivery carries ``properties.error`` and the
  worker dead-letters it; keys and short strings that are not UTF-8 decode with U+FFFD.
"""

from bridge.amqp.frames.framing import HEARTBEAT_EVENT as HEARTBEAT_EVENT
from bridge.amqp.frames.framing import Decoder as Decoder
from bridge.amqp.frames.framing import Delivery as Delivery
from bridge.amqp.frames.framing import Event as Event
from bridge.amqp.frames.framing import Heartbeat as Heartbeat
from bridge.amqp.frames.framing import Returned as Returned
from bridge.amqp.frames.framing import ack_frame as ack_frame
from bridge.amqp.frames.framing import content_frames as content_frames
from bridge.amqp.frames.framing import frame as frame
from bridge.amqp.frames.framing import method_frame as method_frame
from bridge.amqp.frames.framing import nack_frame as nack_frame
from bridge.amqp.frames.framing import publish_frame as publish_frame
from bridge.amqp.frames.methods import METHODS as METHODS
from bridge.amqp.frames.methods import BasicAck as BasicAck
from bridge.amqp.frames.methods import BasicCancel as BasicCancel
from bridge.amqp.frames.methods import BasicCancelOk as BasicCancelOk
from bridge.amqp.frames.methods import BasicConsume as BasicConsume
from bridge.amqp.frames.methods import BasicConsumeOk as BasicConsumeOk
from bridge.amqp.frames.methods import BasicDeliver as BasicDeliver
from bridge.amqp.frames.methods import BasicNack as BasicNack
from bridge.amqp.frames.methods import BasicPublish as BasicPublish
from bridge.amqp.frames.methods import BasicQos as BasicQos
from bridge.amqp.frames.methods import BasicQosOk as BasicQosOk
from bridge.amqp.frames.methods import BasicReject as BasicReject
from bridge.amqp.frames.methods import BasicReturn as BasicReturn
from bridge.amqp.frames.methods import ChannelClose as ChannelClose
from bridge.amqp.frames.methods import ChannelCloseOk as ChannelCloseOk
from bridge.amqp.frames.methods import ChannelFlow as ChannelFlow
from bridge.amqp.frames.methods import ChannelFlowOk as ChannelFlowOk
from bridge.amqp.frames.methods import ChannelOpen as ChannelOpen
from bridge.amqp.frames.methods import ChannelOpenOk as ChannelOpenOk
from bridge.amqp.frames.methods import ConfirmSelect as ConfirmSelect
from bridge.amqp.frames.methods import ConfirmSelectOk as ConfirmSelectOk
from bridge.amqp.frames.methods import ConnectionBlocked as ConnectionBlocked
from bridge.amqp.frames.methods import ConnectionClose as ConnectionClose
from bridge.amqp.frames.methods import ConnectionCloseOk as ConnectionCloseOk
from bridge.amqp.frames.methods import ConnectionOpen as ConnectionOpen
from bridge.amqp.frames.methods import ConnectionOpenOk as ConnectionOpenOk
from bridge.amqp.frames.methods import ConnectionStart as ConnectionStart
from bridge.amqp.frames.methods import ConnectionStartOk as ConnectionStartOk
from bridge.amqp.frames.methods import ConnectionTune as ConnectionTune
from bridge.amqp.frames.methods import ConnectionTuneOk as ConnectionTuneOk
from bridge.amqp.frames.methods import ConnectionUnblocked as ConnectionUnblocked
from bridge.amqp.frames.methods import Method as Method
from bridge.amqp.frames.methods import QueueBind as QueueBind
from bridge.amqp.frames.methods import QueueBindOk as QueueBindOk
from bridge.amqp.frames.methods import QueueDeclare as QueueDeclare
from bridge.amqp.frames.methods import QueueDeclareOk as QueueDeclareOk
from bridge.amqp.frames.methods import UnknownMethod as UnknownMethod
from bridge.amqp.frames.properties import PROPERTY_NAMES as PROPERTY_NAMES
from bridge.amqp.frames.properties import Properties as Properties
from bridge.amqp.frames.properties import replace_headers as replace_headers
from bridge.amqp.frames.tables import FRAME_BODY as FRAME_BODY
from bridge.amqp.frames.tables import FRAME_END as FRAME_END
from bridge.amqp.frames.tables import FRAME_HEADER as FRAME_HEADER
from bridge.amqp.frames.tables import FRAME_HEARTBEAT as FRAME_HEARTBEAT
from bridge.amqp.frames.tables import FRAME_MAX_DEFAULT as FRAME_MAX_DEFAULT
from bridge.amqp.frames.tables import FRAME_METHOD as FRAME_METHOD
from bridge.amqp.frames.tables import HEARTBEAT as HEARTBEAT
from bridge.amqp.frames.tables import MAX_DEPTH as MAX_DEPTH
from bridge.amqp.frames.tables import PROTOCOL_HEADER as PROTOCOL_HEADER
from bridge.amqp.frames.tables import DecodeError as DecodeError
from bridge.amqp.frames.tables import Double as Double
from bridge.amqp.frames.tables import EncodeError as EncodeError
from bridge.amqp.frames.tables import FrameError as FrameError
from bridge.amqp.frames.tables import decode_table as decode_table
from bridge.amqp.frames.tables import encode_table as encode_table
