"""Pages for people: the agent's Command Email pages (usage, subscription and orders,
campaigns, a contact's timeline), reached by a signed portal link, and the operators' pages
(queues, relay, alerts, campaigns, suppression lists) behind an ``ops`` token login.

Server-rendered with Jinja2 from ``templates/web/``; every figure comes from the same use cases
as the JSON API. ``install`` adds the routers, the static files and the answer to a refused
page to the API's application.
"""
