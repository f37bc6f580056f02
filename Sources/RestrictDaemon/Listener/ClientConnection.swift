// The client side of a session, read with back-pressure: the socket is read while the session
// keeps up, and not while a chunk it has not taken is waiting, so at most one read's worth is
// ever buffered, however fast the client writes and however slow the relay is. While the
// session keeps up, the socket's read interest stays registered with epoll (no epoll_ctl per
// read). A write goes out at once and is waited for only while the socket is not taking data.
// Event-loop confined state behind a Sendable front.

import NIOCore

/// Buffers what one socket read delivered and hands it out on request; holds back the
/// channel's next read while a chunk is waiting. Event-loop confined.
final class ClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer

    private var chunks = CircularBuffer<ByteBuffer>()
    private var waiting: EventLoopPromise<ByteBuffer?>?
    private var ended = false
    private var context: ChannelHandlerContext?
    /// A read the channel asked for and this handler held back (a chunk was waiting).
    private var heldRead = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.end()
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let chunk = self.unwrapInboundIn(data)
        if let waiting = self.waiting {
            self.waiting = nil
            waiting.succeed(chunk)
        } else {
            self.chunks.append(chunk)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.end()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.end()
        context.close(promise: nil)
    }

    /// The channel wants to read again (after each read, with autoRead): only when nothing
    /// read before is still waiting for the session.
    func read(context: ChannelHandlerContext) {
        if self.chunks.isEmpty {
            context.read()
        } else {
            self.heldRead = true
        }
    }

    private func end() {
        self.ended = true
        self.waiting?.succeed(nil)
        self.waiting = nil
    }

    /// A chunk already read, if any; nil when none is waiting (the stream may have ended).
    func take() -> ByteBuffer? {
        guard let chunk = self.chunks.popFirst() else { return nil }
        self.resumeReading()
        return chunk
    }

    /// The next chunk, or nil at the end of the stream.
    func next(_ eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer?> {
        if let chunk = self.chunks.popFirst() {
            self.resumeReading()
            return eventLoop.makeSucceededFuture(chunk)
        }
        if self.ended { return eventLoop.makeSucceededFuture(nil) }
        precondition(self.waiting == nil, "two readers of one client connection")
        let promise = eventLoop.makePromise(of: ByteBuffer?.self)
        self.waiting = promise
        self.resumeReading()
        return promise.futureResult
    }

    private func resumeReading() {
        if self.heldRead, self.chunks.isEmpty {
            self.heldRead = false
            self.context?.read()
        }
    }
}

final class ClientConnection: Sendable {
    let channel: any Channel
    private let handler: NIOLoopBound<ClientHandler>

    private init(channel: any Channel, handler: NIOLoopBound<ClientHandler>) {
        self.channel = channel
        self.handler = handler
    }

    /// Takes over an accepted channel (which does not read on its own: see `Listener`), and
    /// lets it read, through the handler's back-pressure.
    static func adopt(_ channel: any Channel) async throws -> ClientConnection {
        @Sendable func install() throws -> NIOLoopBound<ClientHandler> {
            let handler = ClientHandler()
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
            return NIOLoopBound(handler, eventLoop: channel.eventLoop)
        }
        // Sessions run on their connection's event loop (LoopExecutor): no hop needed then.
        let handler = channel.eventLoop.inEventLoop ? try install() : try await channel.eventLoop.submit(install).get()
        return ClientConnection(channel: channel, handler: handler)
    }

    /// The next bytes from the client, or nil when it is gone. Bytes already read are handed
    /// out without suspending.
    func read() async throws -> ByteBuffer? {
        let el = self.channel.eventLoop
        let handler = self.handler
        if el.inEventLoop {
            if let chunk = handler.value.take() { return chunk }
            return try await handler.value.next(el).get()
        }
        return try await el.flatSubmit { handler.value.next(el) }.get()
    }

    /// Writes and flushes. While the socket takes what it is given (the channel is writable),
    /// this does not wait for the write to complete: a failed write closes the channel, and
    /// the session learns it from its next read. Otherwise it waits until the socket took it.
    func write(_ buffer: ByteBuffer) async throws {
        if self.channel.eventLoop.inEventLoop, self.channel.isWritable {
            self.channel.writeAndFlush(buffer, promise: nil)
            return
        }
        try await self.channel.writeAndFlush(buffer)
    }

    func close() {
        self.channel.close(promise: nil)
    }
}
